"""The Z-Image family: what the files say (metadata, a diffusers folder's scheduler shift), model.family,
and turbo.mode = "base" (plain LoRA on the base / De-Turbo, de-turbo previews, 8-step previews on a Turbo
file + the LoRA)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from _loop_helpers import SIZE, Events, make_config
from PIL import Image
from safetensors.torch import save_file

from trainer.config import ConfigError
from trainer.demo import make_dataset
from trainer.errors import ZitError
from trainer.loop import Trainer
from trainer.lora.formats import read_lora
from trainer.lora.spec import ZitSpec
from trainer.model import build_transformer, to_comfy_state_dict
from trainer.model.family import detect_family, resolve_family
from trainer.tiny import tiny_transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def write_single_file(path: Path, metadata: dict[str, str] | None = None, model=None) -> Path:
    """A ComfyUI single-file transformer (the tiny model unless `model`), with safetensors metadata."""
    model = model if model is not None else tiny_transformer(0)
    save_file(to_comfy_state_dict(model.state_dict(), "model.diffusion_model."), str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("metadata, family", [
    ({"zit.family": "base"}, "base"),
    ({"modelspec.title": "Z-Image-De-Turbo"}, "deturbo"),
    ({"modelspec.title": "Z-Image-Turbo"}, "turbo"),
    ({"modelspec.title": "Z-Image Base"}, "base"),
    ({"modelspec.title": "my merge"}, None),
    (None, None),
])
def test_the_family_comes_from_the_files_metadata(tmp_path, metadata, family):
    found = detect_family(write_single_file(tmp_path / "z.safetensors", metadata))
    assert (found[0] if found else None) == family
    if found:
        assert next(iter(metadata)) in found[1]  # the evidence names the key


def test_a_diffusers_folder_with_shift_6_is_the_base(tmp_path):
    folder = tmp_path / "Z-Image"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "transformer").mkdir()
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({"shift": 6.0}))
    assert detect_family(folder / "transformer")[0] == "base"
    config.write_text(json.dumps({"shift": 3.0}))  # Turbo and De-Turbo both ship 3: undecided
    assert detect_family(folder / "transformer") is None


def test_auto_says_when_it_assumes_and_a_contradiction_is_refused(tmp_path):
    plain = write_single_file(tmp_path / "plain.safetensors")
    family = resolve_family("auto", plain)
    assert family.name == "turbo" and "assumed" in family.how and "model.family" in family.how
    assert resolve_family("deturbo", plain).name == "deturbo"
    base = write_single_file(tmp_path / "base.safetensors", {"zit.family": "base"})
    assert resolve_family("auto", base).name == "base"
    with pytest.raises(ZitError, match=r"model.family = 'turbo', but .*base.safetensors is Z-Image \(base\)"):
        resolve_family("turbo", base)


@pytest.mark.parametrize("sections, words", [
    ({"turbo": {"mode": "base"}}, 'turbo.mode = "base" trains on Z-Image base or De-Turbo, but model.family'),
    ({"model": {"family": "base"}}, 'model.family = "base" with turbo.mode = "sft"'),
    ({"model": {"family": "deturbo"}, "turbo": {"mode": "adapter", "adapter": "a.safetensors"}},
     'the deturbo model is not distilled'),
    ({"preview": {"every": 0, "turbo_model": "t.safetensors"}},
     'preview.turbo_model = "t.safetensors": only'),
])
def test_family_and_mode_must_agree(tmp_path, sections, words):
    sections = {"model": {"family": "turbo"}, **sections} if "model" not in sections else sections
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        make_config(tmp_path, tmp_path, **sections)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("family") / "images", n=2, size=SIZE)


def base_config(out: Path, images: Path, turbo_model: str = "", **preview):
    return make_config(out, images, model={"family": "base"}, turbo={"mode": "base"}, optim={"steps": 2},
                       preview={"every": 2, "prompts": ["a red circle"], "width": 32, "height": 32,
                                "deturbo_steps": 2, "turbo_steps": 2, "health_every": 1,
                                "turbo_model": turbo_model, **preview})


def test_base_mode_trains_previews_de_turbo_and_on_turbo_with_the_lora(tmp_path, images):
    turbo = write_single_file(tmp_path / "turbo.safetensors", {"modelspec.title": "Z-Image-Turbo"})
    events = Events()
    result = Trainer(base_config(tmp_path, images, str(turbo)), events).run()
    previews = [d for k, d in events.seen if k == "preview"]
    assert [p["rows"] for p in previews][-1] == ["de-turbo 2 steps cfg 2", "Turbo + LoRA 2 steps cfg 1"]
    assert Image.open(previews[-1]["path"]).height > 2 * 32  # two rows of 32 px (and their labels)
    assert not [d for k, d in events.seen if k == "health"]  # the base is not distilled: no turbo health
    logs = [d["message"] for k, d in events.seen if k == "log"]
    assert "model: Z-Image (base) (model.family)" in logs
    meta = read_lora(result.lora_path).metadata
    assert meta["zit.family"] == "base" and meta["zit.mode"] == "base"


@pytest.mark.parametrize("what, words", [
    ("base", "is Z-Image (base)"),
    ("wide", "differ from the training model's"),
    ("missing", "not found"),
    ("flux", "looks like a Flux transformer"),
])
def test_a_turbo_preview_file_that_is_not_turbo_is_refused_before_loading(tmp_path, images, what, words):
    path = tmp_path / f"{what}.safetensors"
    if what == "base":
        write_single_file(path, {"zit.family": "base"})
    elif what == "flux":
        save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(24, 8)}, str(path))
    elif what == "wide":
        spec = ZitSpec(dim=96, n_layers=2, n_refiner_layers=1, n_heads=3, cap_feat_dim=32, in_channels=16)
        write_single_file(path, model=build_transformer(spec, "cpu").to(torch.float32))
    events = Events()
    with pytest.raises(ZitError, match=re.escape(words)) as info:
        Trainer(base_config(tmp_path, images, str(path)), events)
    assert "preview.turbo_model" in str(info.value) and "\n" not in str(info.value)
    assert not any("loading the model" in d.get("message", "") for _, d in events.seen)
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("family, mode, words", [
    ("base", "sft", 'turbo.mode = "sft" is for Z-Image-Turbo, but the model is Z-Image (base)'),
    ("turbo", "base",
     'turbo.mode = "base" trains on Z-Image base or De-Turbo, but the model is Z-Image-Turbo'),
])
def test_a_detected_family_that_contradicts_the_mode_is_refused(tmp_path, images, family, mode, words):
    model = write_single_file(tmp_path / "z.safetensors", {"zit.family": family})
    cfg = make_config(tmp_path, images, model={"transformer": str(model), "text_encoder": "te", "vae": "vae"},
                      turbo={"mode": mode})
    with pytest.raises(ZitError, match=re.escape(words)):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


def test_base_mode_takes_an_undetected_model_as_the_base(tmp_path, images):
    events = Events()
    cfg = make_config(tmp_path, images, turbo={"mode": "base"}, optim={"steps": 1}, preview={"every": 0})
    Trainer(cfg, events)
    assert "model: Z-Image (base) (turbo.mode = base; the file does not say)" in [
        d["message"] for k, d in events.seen if k == "log"]
