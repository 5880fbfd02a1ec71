"""The training loop end to end on the tiny model (CPU, fp32): learning, saved LoRAs, previews, resume, stop,
failures, the warm cache and the CLI.

Every run is a real Trainer on the tiny seeded Z-Image stack at 64 px (4 image tokens per side after the
patch), so a step takes milliseconds; bitwise comparisons hold because CPU fp32 with one thread is
deterministic and the saved LoRAs are fp32 with alpha = rank (the folded scale is exactly 1).
"""

from __future__ import annotations

import functools
import itertools
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from trainer import loop, run_models, run_setup, sampling, step_loss, tiny
from trainer.checkpoint import find_latest_checkpoint
from trainer.cli import main as cli_main
from trainer.config import ConfigError, TrainConfig, config_from_dict, config_to_toml
from trainer.data import build_cache, cached_text_embeddings, load_dataset
from trainer.demo import make_adapter, make_dataset
from trainer.errors import ZitError
from trainer.job import FAILED, STOPPED, JobRunner
from trainer.loop import TRAINED, Trainer, train
from trainer.lora.formats import read_lora
from trainer.lora.spec import diffusers_name
from trainer.model import adapters_disabled, load_lora_into_peft, lora_from_peft, predict_velocity
from trainer.sampling import SamplerSettings, grid, sample_latents, to_pil

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Three 64 px images with caption files."""
    return make_dataset(tmp_path_factory.mktemp("data") / "images", n=3, size=SIZE)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A latent/text cache shared by the runs of this module (content-addressed, so order does not matter)."""
    return tmp_path_factory.mktemp("cache")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) for k, v in base.items()}
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def make_config(
    out: Path, dataset: Path, cache: Path | None = None, **sections: dict[str, Any]
) -> TrainConfig:
    """A tiny fp32 run in `out`: rank 4 = alpha, fp32 saves, no previews or step saves unless asked."""
    base = {
        "model": {"transformer": "tiny", "dtype": "fp32", "gradient_checkpointing": False},
        "data": {"dataset": str(dataset), "resolutions": [SIZE], "min_side": 32, "caption_dropout": 0.0,
                 "cache_dir": str(cache or out / "cache")},
        "lora": {"rank": 4, "alpha": 4.0, "save_dtype": "fp32"},
        "optim": {"lr": 1e-2, "steps": 6, "seed": 0},
        "save": {"output_dir": str(out), "name": "run", "every": 0},
        "preview": {"every": 0},
    }
    return config_from_dict(_merge(base, sections), source="test")


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


class StopAfter:
    """A JobContext stand-in that asks to stop once `step` steps are done and records the events."""

    def __init__(self, step: int):
        self.step, self.done = step, 0
        self.events: list[tuple[str, dict[str, Any]]] = []

    @property
    def stop_requested(self) -> bool:
        return self.done >= self.step

    def emit(self, kind: str, **data: Any) -> None:
        self.events.append((kind, data))
        if kind == "progress":
            self.done = data["step"]


# ---- learning ------------------------------------------------------------------------------------------


def test_loss_falls_on_an_overfit_set(tmp_path):
    one = make_dataset(tmp_path / "one", n=1, size=SIZE)
    cfg = make_config(tmp_path, one, data={"caption": "zqx, a red circle"},
                      objective={"timesteps": "logit_normal", "logit_std": 0.01},  # sigma 0.5 +- 0.003
                      optim={"steps": 80, "lr": 1e-2})
    losses = train(cfg).losses
    assert len(losses) == 80 and all(map(torch.isfinite, torch.tensor(losses)))
    first, last = statistics.mean(losses[:10]), statistics.mean(losses[-10:])
    assert last < 0.85 * first, f"loss {first:.4f} -> {last:.4f}"


# ---- what is saved -------------------------------------------------------------------------------------


def test_saved_lora_changes_the_output_only_when_loaded(tmp_path, images, cache):
    trainer = Trainer(make_config(tmp_path, images, cache))
    path = trainer.run().lora_path
    lora = read_lora(path)
    gen = torch.Generator().manual_seed(1)
    x, sigma = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=gen), torch.tensor([0.6])
    text = [torch.randn(12, tiny.TINY_SPEC.cap_feat_dim, generator=gen)]

    model = tiny.tiny_transformer(0)
    base = predict_velocity(model, x, sigma, text)
    load_lora_into_peft(model, lora, "loaded", trainable=False)
    with_lora = predict_velocity(model, x, sigma, text)
    with adapters_disabled(model):
        disabled = predict_velocity(model, x, sigma, text)

    assert (with_lora - base).abs().max() > 1e-3
    assert torch.equal(disabled, base)
    trainer.model.eval()
    with torch.no_grad():
        in_training = predict_velocity(trainer.model, x, sigma, text)
    torch.testing.assert_close(in_training, with_lora, atol=1e-5, rtol=1e-5)
    assert lora.metadata["zit.step"] == "6" and lora.metadata["zit.base_model"] == "tiny-0"


def test_adapter_mode_saves_only_the_trained_lora_and_previews_without_the_adapter(
    tmp_path, images, cache, monkeypatch
):
    latents: list[torch.Tensor] = []

    def spy(*args, **kwargs):
        z = sample_latents(*args, **kwargs)
        latents.append(z.clone())
        return z

    monkeypatch.setattr(sampling, "sample_latents", spy)
    adapter = make_adapter(tmp_path / "adapter.safetensors")
    prompts = ["zqx, a red circle", "a blue square"]
    cfg = make_config(tmp_path, images, cache, lora={"rank": 8, "alpha": 8.0},
                      turbo={"mode": "adapter", "adapter": str(adapter)},
                      preview={"every": 6, "prompts": prompts, "width": SIZE, "height": SIZE, "seed": 3})
    trainer = Trainer(cfg)
    result = trainer.run()
    assert len(result.previews) == 2 and len(latents) == 2  # before training and at the end

    saved = read_lora(result.lora_path)
    trained = lora_from_peft(trainer.model, TRAINED)
    assert saved.ranks() == {8} and read_lora(adapter).ranks() == {4}
    assert saved.modules.keys() == trained.modules.keys()
    for key, module in trained.modules.items():
        assert torch.equal(saved.modules[key].a, module.a) and torch.equal(saved.modules[key].b, module.b)

    # The last preview is exactly base + saved LoRA, sampled from scratch (latents and decoded pixels).
    fresh = tiny.tiny_transformer(0)
    load_lora_into_peft(fresh, saved, "loaded", trainable=False)
    settings = SamplerSettings("turbo", cfg.preview.turbo_steps, 1.0)
    seeds = [cfg.preview.seed + i for i in range(len(prompts))]
    z = sample_latents(fresh, trainer.preview_embeds, trainer.empty_embed, seeds, SIZE, SIZE, settings)
    assert torch.equal(z, latents[-1])
    picture = grid([to_pil(tiny.tiny_vae(0).decode(z))], title="step 6, training adapter off",
                   row_labels=[f"turbo {cfg.preview.turbo_steps} steps cfg 1"], col_labels=prompts)
    assert Image.open(result.previews[-1]).convert("RGB").tobytes() == picture.tobytes()

    # ... and the adapter does matter: with it on, the same sampling gives something else.
    trainer.model.eval()
    z_with_adapter = sample_latents(trainer.model, trainer.preview_embeds, trainer.empty_embed, seeds, SIZE,
                                    SIZE, settings)
    assert (z_with_adapter - z).abs().max() > 1e-3
    with adapters_disabled(trainer.model, [TRAINED]):  # base + adapter: the adapter was really trained over
        z_adapter_only = sample_latents(trainer.model, trainer.preview_embeds, trainer.empty_embed, seeds,
                                        SIZE, SIZE, settings)
    assert (z_adapter_only - z_with_adapter).abs().max() > 1e-4


# ---- resume and EMA ------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [
    {},
    {"optim": {"grad_accum": 2, "ema": True, "ema_decay": 0.9, "scheduler": "cosine", "warmup_steps": 2},
     "data": {"caption_dropout": 0.4}},
], ids=["plain", "accum2-ema-dropout-cosine"])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, images, cache, extra):
    steps = 8
    full_cfg = make_config(tmp_path / "full", images, cache, **_merge(extra, {"optim": {"steps": steps}}))
    full = train(full_cfg)

    cfg = make_config(tmp_path / "split", images, cache,
                      **_merge(extra, {"optim": {"steps": steps}, "save": {"every": steps // 2}}))
    first = Trainer(cfg, ctx=StopAfter(steps // 2)).run()
    assert first.stopped and first.step == steps // 2
    ckpt = find_latest_checkpoint(cfg.run_dir, cfg.save.name)
    assert ckpt.step == steps // 2 and ckpt.state is not None
    second = Trainer(cfg, resume=True)
    assert second.step == steps // 2
    rest = second.run()

    assert rest.step == steps and not rest.stopped
    assert rest.losses == full.losses[steps // 2:]
    assert_same_tensors(tensors(rest.lora_path), tensors(full.lora_path))


def test_ema_weights_are_saved_and_training_continues_on_the_raw_ones(tmp_path, images, cache):
    decay, steps = 0.9, 6
    cfg = make_config(tmp_path, images, cache, optim={"ema": True, "ema_decay": decay, "steps": steps})
    trainer = Trainer(cfg)
    shadow = {n: p.detach().clone() for n, p in trainer.params.items()}
    raw: dict[str, torch.Tensor] = {}

    class FoldEachStep(StopAfter):
        def emit(self, kind: str, **data: Any) -> None:  # after optimizer step k (1-based) the EMA folds in
            if kind == "progress":  # the weights with d = min(decay, (1 + i) / (10 + i)), i = k - 1 (0-based)
                i = data["step"] - 1
                d = min(decay, (1 + i) / (10 + i))
                for n, p in trainer.params.items():
                    shadow[n] = d * shadow[n] + (1 - d) * p.detach()
                    raw[n] = p.detach().clone()

    trainer.ctx = FoldEachStep(steps + 1)
    saved = read_lora(trainer.run().lora_path)

    assert all(torch.equal(p, raw[n]) for n, p in trainer.params.items())  # the swap was undone
    for key, module in saved.modules.items():
        name = diffusers_name(key)
        a, b = shadow[f"{name}.lora_A.{TRAINED}.weight"], shadow[f"{name}.lora_B.{TRAINED}.weight"]
        torch.testing.assert_close(module.a, a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(module.b, b, rtol=1e-5, atol=1e-7)
    b_raw = torch.cat([raw[n].flatten() for n in sorted(raw) if ".lora_B." in n])
    b_saved = torch.cat([shadow[n].flatten() for n in sorted(shadow) if ".lora_B." in n])
    assert (b_raw - b_saved).abs().max() > 0.1 * b_raw.abs().max()


def test_gradient_checkpointing_trains_the_same_lora(tmp_path, images, cache):
    runs = [train(make_config(tmp_path / str(on), images, cache, model={"gradient_checkpointing": on},
                              optim={"steps": 3})) for on in (False, True)]
    assert runs[0].losses == runs[1].losses
    assert_same_tensors(tensors(runs[1].lora_path), tensors(runs[0].lora_path))
    assert max(m.b.abs().max().item() for m in read_lora(runs[1].lora_path).modules.values()) > 0


# ---- differential guidance ------------------------------------------------------------------------------


def test_differential_guidance_extrapolates_from_the_frozen_base(tmp_path, images, cache):
    adapter = make_adapter(tmp_path / "adapter.safetensors")
    runs = {}
    for mode, turbo in (("adapter", {}), ("adapter_dg", {"guidance_scale": 1.0})):
        cfg = make_config(tmp_path / mode, images, cache, optim={"steps": 4},
                          turbo={"mode": mode, "adapter": str(adapter), **turbo})
        runs[mode] = train(cfg)
    plain, dg = runs["adapter"], runs["adapter_dg"]
    # At step 1 the LoRA is zero, so pred = base (adapter on): target' - pred = (1 + g)(target - pred).
    assert dg.losses[0] == pytest.approx(4.0 * plain.losses[0], rel=1e-4)
    assert max_diff(tensors(dg.lora_path), tensors(plain.lora_path)) > 1e-4


# ---- the job runner: stop and failure ------------------------------------------------------------------


def test_stop_through_the_job_runner_saves_a_resumable_checkpoint(tmp_path, images, cache):
    cfg = make_config(tmp_path, images, cache, optim={"steps": 500}, save={"every": 2})
    runner = JobRunner()
    progress = []

    def listener(event):
        if event.kind == "progress":
            progress.append(event.data["step"])
            if event.data["step"] == 3:
                runner.get(event.job_id).stop()

    runner.subscribe(listener)
    job = runner.start("train", lambda ctx: train(cfg, ctx))
    assert job.wait(120)
    assert job.status == STOPPED and job.error is None, job.error
    assert job.result.stopped and job.result.step == 3 and progress == [1, 2, 3]
    ckpt = find_latest_checkpoint(cfg.run_dir, cfg.save.name)
    assert ckpt.step == 3 and ckpt.lora is not None and ckpt.state is not None
    assert read_lora(ckpt.lora).metadata["zit.step"] == "3"

    resumed = make_config(tmp_path, images, cache, optim={"steps": 5}, save={"every": 2})
    result = train(resumed, resume=True)
    assert result.step == 5 and len(result.losses) == 2


def test_nan_loss_fails_the_job_and_keeps_the_last_checkpoint(tmp_path, images, cache, monkeypatch):
    calls = itertools.count(1)
    real_loss = step_loss.flow_loss

    def nan_at_step_5(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if next(calls) == 5 else loss

    monkeypatch.setattr(step_loss, "flow_loss", nan_at_step_5)
    cfg = make_config(tmp_path, images, cache, optim={"steps": 8}, save={"every": 2})
    job = JobRunner().start("train", lambda ctx: train(cfg, ctx))
    assert job.wait(120)
    assert job.status == FAILED
    assert "nan" in job.error.lower() and "step 5" in job.error, job.error

    ckpt = find_latest_checkpoint(cfg.run_dir, cfg.save.name)
    assert ckpt.step == 4
    lora = read_lora(ckpt.lora)
    assert all(torch.isfinite(m.b).all() for m in lora.modules.values())
    assert_same_tensors(tensors(cfg.run_dir / "run.safetensors"), tensors(ckpt.lora))
    monkeypatch.undo()
    assert train(cfg, resume=True).step == 8


# ---- bad input is refused before training ---------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    """Fail loudly if a run loads the model or takes a step."""

    def refuse(*args, **kwargs):
        raise AssertionError("got past the input checks")

    monkeypatch.setattr(run_setup, "open_models", refuse)
    monkeypatch.setattr(Trainer, "train_step", refuse)


def _corrupt_folder(tmp_path: Path) -> Path:
    folder = make_dataset(tmp_path / "corrupt", n=1, size=SIZE)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    (folder / "broken.txt").write_text("a broken image")
    return folder


@pytest.mark.parametrize("case", ["empty", "missing", "corrupt"])
def test_bad_dataset_is_a_zit_error_naming_it_before_the_model_loads(tmp_path, no_training, case):
    if case == "empty":
        folder, words = tmp_path / "empty", ["empty", "no usable images"]
        folder.mkdir()
    elif case == "missing":
        folder, words = tmp_path / "nowhere", ["nowhere", "does not exist"]
    else:
        folder, words = _corrupt_folder(tmp_path), ["broken.png"]
    cfg = make_config(tmp_path, folder, data={"bad_image": "error"})
    with pytest.raises(ZitError) as info:
        train(cfg)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_a_missing_adapter_file_is_named(tmp_path, images, cache):
    cfg = make_config(tmp_path, images, cache,
                      turbo={"mode": "adapter", "adapter": str(tmp_path / "no_adapter.safetensors")})
    with pytest.raises(ZitError, match="no_adapter.safetensors"):
        train(cfg)
    assert not list(cfg.run_dir.glob("*.safetensors"))


def test_a_missing_transformer_file_is_a_zit_error_naming_it(tmp_path, images):
    cfg = make_config(tmp_path, images, model={"transformer": str(tmp_path / "zit_missing.safetensors"),
                                               "text_encoder": str(tmp_path / "te.safetensors"),
                                               "vae": str(tmp_path / "ae.safetensors")})
    with pytest.raises(ZitError, match="zit_missing.safetensors"):
        train(cfg)


@pytest.mark.parametrize("section, values, field", [
    ("optim", {"lr": 0}, "optim.lr"),
    ("data", {"resolutions": [100]}, "data.resolutions"),
    ("turbo", {"mode": "adapter"}, "turbo.adapter"),
    ("preview", {"every": 5}, "preview.prompts"),
    ("optim", {"learning_rate": 1e-3}, "optim.learning_rate"),
])
def test_bad_config_is_a_config_error_naming_the_field(tmp_path, images, section, values, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make_config(tmp_path, images, **{section: values})


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


# ---- the command line ----------------------------------------------------------------------------------


def test_cli_trains_from_a_toml_config(tmp_path, images, cache, capsys):
    cfg = make_config(tmp_path, images, cache, optim={"steps": 3})
    path = tmp_path / "run.toml"
    path.write_text(config_to_toml(cfg))
    assert cli_main(["train", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    final = cfg.run_dir / "run.safetensors"
    assert f"LoRA: {final} (step 3)" in out
    assert read_lora(final).metadata["zit.step"] == "3"


def test_cli_unknown_key_exits_2_with_one_line_naming_it(tmp_path, images):
    cfg = make_config(tmp_path, images)
    path = tmp_path / "run.toml"
    path.write_text(config_to_toml(cfg).replace("[optim]\n", "[optim]\nlearning_rate = 0.001\n"))
    proc = subprocess.run([sys.executable, "-m", "trainer", "train", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.learning_rate" in lines[0] and str(path) in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_train_bench_dry_run_runs_the_cuda_code_path_on_the_cpu(monkeypatch, capsys):
    """The bench's GPU mode cannot run here; its --dry-run keeps that code in step with the engine."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_bench", REPO / "bench" / "train_bench.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_bench", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    monkeypatch.setattr(sys, "argv", ["train_bench.py", "--dry-run", "--steps", "1", "--warmup", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert "diffusers + peft reference" in out and "engine Trainer.train_step" in out
    assert bench.step_flops(bench.Case(bench.ZIT, 1024, 512, 32, torch.bfloat16, torch.device("cpu"), True),
                            6_154_908_736) == pytest.approx(2.01e14, rel=0.01)  # 3 x (2 N L + attn)


def test_gpu_suite_dry_run_runs_every_memory_plan_on_the_cpu(monkeypatch, capsys):
    """bench/gpu_suite.py's rows (reference, bf16, fp8, fp8 + swap at two depths) run through the Trainer."""
    import importlib.util

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "bench" / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_suite", suite)
    spec.loader.exec_module(suite)
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "--dry-run"])
    suite.main()
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("bf16", "fp8"))]
    rows = {line.split("  ")[0]: line.split() for line in lines}
    assert set(rows) == {"bf16", "fp8", "fp8 + swap (K=2)", "fp8 + swap (K=1)"}, out
    loads = {name: float(cells[-1]) for name, cells in rows.items()}  # blocks copied in per step
    assert loads == {"bf16": 0, "fp8": 0, "fp8 + swap (K=2)": 0, "fp8 + swap (K=1)": 2}, out


def test_turbo_health_is_measured_sent_and_saved_in_the_lora(tmp_path, images, cache):
    ctx = StopAfter(10**6)
    cfg = make_config(tmp_path, images, cache, preview={"health_every": 2, "health_size": 64})
    result = Trainer(cfg, ctx).run()
    health = [d for kind, d in ctx.events if kind == "health"]
    assert [d["step"] for d in health] == [2, 4, 6]
    assert all(d["health"] > 0 and d["threshold"] > 1 for d in health)
    assert health[0]["health"] != health[-1]["health"]  # the LoRA moved the 8-step trajectory
    saved = read_lora(result.lora_path).metadata["zit.turbo_health"]
    assert float(saved) == pytest.approx(health[-1]["health"], abs=1e-4)
