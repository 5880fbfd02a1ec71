"""The training nodes' pieces in this process, with ComfyUI imported CPU-only and no server: the node
choices follow the engine's config, the text and image encoders keep the engine's conventions, publishing
mirrors a run's LoRAs into the loras folder, the public job view holds no paths, and the GPU-memory reserve
tracks the job's working memory.

Skipped (through the comfyui_root fixture) without a ComfyUI checkout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="module")
def pack_nodes(comfyui_root: Path) -> Any:
    import importlib

    from conftest import inproc

    inproc.setup(comfyui_root)
    return importlib.import_module(f"{inproc.PACK}.nodes")


def test_node_choices_follow_the_config(pack_nodes: Any):
    from trainer.config import FIELDS

    training, dataset = pack_nodes.training, pack_nodes.dataset
    assert set(training.TURBO) == set(FIELDS["turbo.mode"].choices)
    assert training.OPTIMIZERS == FIELDS["optim.optimizer"].choices
    assert training.MEMORY == FIELDS["model.memory"].choices
    assert training.FAMILY == FIELDS["model.family"].choices
    assert dataset.MISSING_CAPTION == FIELDS["data.missing_caption"].choices
    assert dataset.BAD_IMAGE == FIELDS["data.bad_image"].choices
    assert set(training.OWNED) <= set(FIELDS)


class FakeClip:
    """encode_from_tokens as ComfyUI's Z-Image CLIP returns it: cond (1, L, D) and a (1, L) attention mask."""

    def __init__(self, cond: Any, mask: Any = None):
        self.cond, self.mask, self.texts = cond, mask, []

    def tokenize(self, text: str) -> dict:
        self.texts.append(text)
        return {"qwen3_4b": [[(1, 1.0)]]}

    def encode_from_tokens(self, tokens: dict, return_dict: bool = False) -> dict:
        out = {"cond": self.cond, "pooled_output": None}
        if self.mask is not None:
            out["attention_mask"] = self.mask
        return out


def test_text_encoding_drops_padding_and_keeps_the_engine_length(pack_nodes: Any):
    import torch

    cond = torch.arange(6 * 3, dtype=torch.float32).reshape(1, 6, 3)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    encode = pack_nodes.dataset.text_encoder(FakeClip(cond, mask), max_tokens=512)
    assert torch.equal(encode(["a"])[0], cond[0, :4])
    clip = FakeClip(cond)  # no mask (e.g. a CLIP-L): nothing to trim but the engine's 512-token cut
    short = pack_nodes.dataset.text_encoder(clip, max_tokens=5)(["a", ""])
    assert [t.shape for t in short] == [(5, 3), (5, 3)] and clip.texts == ["a", ""]


def test_image_encoding_is_the_engine_latent_convention(pack_nodes: Any):
    import torch

    class FakeVae:
        latent_channels = 16

        def encode(self, images: Any) -> Any:  # ComfyUI: (B,H,W,3) in [0, 1] -> raw latent (B,16,h,w)
            self.seen = images
            return torch.full((1, 16, 2, 2), 1.1159)

    vae = FakeVae()
    pixels = torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 3, 1, 1).expand(1, 3, 16, 16)
    z = pack_nodes.dataset.image_encoder(vae)(pixels)
    assert vae.seen.shape == (1, 16, 16, 3)
    assert torch.allclose(vae.seen[0, 0, 0], torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(z, torch.full((1, 16, 2, 2), 0.3611))  # (latent - 0.1159) * 0.3611


def test_publish_mirrors_the_runs_loras_and_only_them(pack_nodes: Any, tmp_path: Path):
    publish = pack_nodes.training_job.publish
    run, target = tmp_path / "run", tmp_path / "loras" / "r"
    run.mkdir()
    for step in (2, 4):
        (run / f"r-step{step:06d}.safetensors").write_bytes(b"lora %d" % step)
    (run / "state-step000004").mkdir()
    (run / "r.safetensors").write_bytes(b"final 4")
    publish(run, target, "r")
    names = ["r-step000002.safetensors", "r-step000004.safetensors", "r.safetensors"]
    assert sorted(p.name for p in target.iterdir()) == names
    (run / "r-step000002.safetensors").unlink()  # pruned by keep_last
    (run / "r-step000006.safetensors").write_bytes(b"lora 6")
    (run / "r.safetensors").unlink()
    (run / "r.safetensors").write_bytes(b"final 6")  # replaced, as the engine's atomic write does
    (target / "other.safetensors").write_bytes(b"not ours")
    publish(run, target, "r")
    names = ["other.safetensors", "r-step000004.safetensors", "r-step000006.safetensors", "r.safetensors"]
    assert sorted(p.name for p in target.iterdir()) == names
    assert (target / "r.safetensors").read_bytes() == b"final 6"


def test_the_public_view_has_no_paths_and_valid_json(pack_nodes: Any):
    import folder_paths

    jobs, out = pack_nodes.jobs, folder_paths.get_output_directory()
    data = jobs.public_data("train-9", "preview", {"step": 2, "path": f"{out}/runs/x/previews/s.png"})
    assert data == {"step": 2, "name": "s.png", "url": "/zit/jobs/train-9/previews/s.png"}
    data = jobs.public_data("train-9", "status", {"status": "failed", "error": f"{out}/cache: bad"})
    assert data["error"] == "<output>/cache: bad"
    assert jobs.public_data("train-9", "progress", {"eta_s": float("inf")}) == {"eta_s": None}


def test_vram_reserve_tracks_the_jobs_working_memory_and_gives_it_back(pack_nodes: Any, monkeypatch):
    """The GPU-memory policy's bookkeeping, with CUDA's counters stubbed (no GPU here)."""
    import comfy.model_management as mm
    import torch

    counters = {"peak": 10 << 30, "now": 4 << 30}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: counters.update(peak=counters["now"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: counters["peak"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: counters["now"])
    base = mm.EXTRA_RESERVED_VRAM
    reserve = pack_nodes.training_job.VramReserve()
    reserve.start()
    reserve.update()
    assert mm.EXTRA_RESERVED_VRAM == base  # no step yet: peak == allocated
    counters["peak"] = 10 << 30  # a step's activations came and went
    reserve.update()
    assert mm.EXTRA_RESERVED_VRAM == base + (6 << 30)
    counters["peak"] = 9 << 30  # never shrinks while the job runs
    reserve.update()
    assert mm.EXTRA_RESERVED_VRAM == base + (6 << 30)
    counters["peak"] = 12 << 30
    reserve.update()
    assert mm.EXTRA_RESERVED_VRAM == base + (8 << 30)
    reserve.release()
    assert mm.EXTRA_RESERVED_VRAM == base
