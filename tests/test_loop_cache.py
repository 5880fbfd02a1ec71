"""The training loop and the latent/text cache (tiny model, CPU, fp32): a warm cache never builds the
encoders, and a cache a front end filled (the ComfyUI node's path) trains the same LoRA, a miss naming the
hint.
"""

from __future__ import annotations

import functools

import pytest
from _loop_helpers import SIZE, assert_same_tensors, make_config, tensors
from _loop_helpers import images as images  # a fixture (module-scoped here)

from trainer import loop, run_models, tiny
from trainer.data import build_cache, cached_text_embeddings, load_dataset
from trainer.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the cache -----------------------------------------------------------------------------------------


def test_a_warm_cache_never_builds_the_encoders(tmp_path, images, monkeypatch):
    built = {"vae": 0, "te": 0}
    real_vae, real_te = tiny.tiny_vae, tiny.tiny_text_encoder

    def counting(kind, real):
        def build(*args, **kwargs):
            built[kind] += 1
            return real(*args, **kwargs)
        return build

    monkeypatch.setattr(tiny, "tiny_vae", counting("vae", real_vae))
    monkeypatch.setattr(tiny, "tiny_text_encoder", counting("te", real_te))
    first = train(make_config(tmp_path / "a", images, tmp_path / "cache", optim={"steps": 2}))
    assert built == {"vae": 1, "te": 1}

    def refuse(*args, **kwargs):
        raise AssertionError("an encoder was built although the cache is warm")

    monkeypatch.setattr(tiny, "tiny_vae", refuse)
    monkeypatch.setattr(tiny, "tiny_text_encoder", refuse)
    second = train(make_config(tmp_path / "b", images, tmp_path / "cache", optim={"steps": 2}))
    assert_same_tensors(tensors(second.lora_path), tensors(first.lora_path))


def test_a_front_end_cache_trains_the_same_lora_and_a_miss_is_named(tmp_path, images):
    """cache_only_models + a prepared dataset (the ComfyUI node's path): the encoders never run in the job;
    a cache the front end filled with the same encodings trains exactly the engine's LoRA; a miss names the
    hint."""
    prompts = ["a red circle"]
    sections = {"optim": {"steps": 2}, "preview": {"every": 2, "prompts": prompts, "width": SIZE,
                                                    "height": SIZE, "turbo_steps": 2}}
    own = train(make_config(tmp_path / "own", images, tmp_path / "own-cache", **sections))
    cfg = make_config(tmp_path / "front", images, tmp_path / "front-cache", **sections)
    dataset = load_dataset(images, [SIZE], min_side=32)
    vae, te = tiny.tiny_vae(0), tiny.tiny_text_encoder(0)
    build_cache(dataset, cfg.cache_path, vae.encode, te.encode, "front-vae", "front-te")
    cached_text_embeddings(prompts, cfg.cache_path, te.encode, "front-te")
    models = functools.partial(run_models.cache_only_models, vae_id="front-vae", te_id="front-te", vae="tiny",
                               hint="encode the dataset again")
    front = train(cfg, models=models, dataset=dataset)
    assert front.step == 2 and [p.name for p in front.previews] == ["step000000.png", "step000002.png"]
    assert_same_tensors(tensors(front.lora_path), tensors(own.lora_path))

    other = functools.partial(models, vae_id="another-vae")
    with pytest.raises(loop.TrainingError, match="no image latent.*encode the dataset again"):
        train(make_config(tmp_path / "miss", images, tmp_path / "front-cache", **sections), models=other,
              dataset=dataset)
