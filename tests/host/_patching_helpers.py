"""What the in-process ZIT node tests (test_patching_*.py) share: the toy Z-Image models, a loras folder of
its own for ComfyUI, seeded LoRAs, and reading patched weights.

The model is ComfyUI's own Z-Image NextDiT at toy sizes (dim 256) wrapped in a ModelPatcher, holding the
weights of a diffusers ZImageTransformer2DModel of the same sizes (except t_embedder, whose shape differs
below dim 1024). Patched weights are read the way sampling gets them: ModelPatcher.patch_model().

Import it after the test module's preamble (skip without a ComfyUI checkout, then host.setup): it imports
ComfyUI's modules and the pack as zit_trainer_pack. A test module imports the fixtures under their own names
(`from _patching_helpers import base as base`): each module then gets its own module-scoped instances, as
when they were defined there; a fixture's own fixtures (base needs dmodel) are imported with it.
"""

from __future__ import annotations

import _comfy_inproc as host
import folder_paths
import pytest
import torch
from zit_trainer_pack.trainer.lora import writing
from zit_trainer_pack.trainer.lora.canonical import Lora
from zit_trainer_pack.trainer.lora.spec import BASE, ZitSpec, comfy_name
from zit_trainer_pack.trainer.lora.synth import random_lora
from zit_trainer_pack.trainer.model import build_transformer, to_comfy_state_dict

import nodes as core_nodes

SPEC = ZitSpec(dim=256, n_layers=2, n_refiner_layers=2, n_heads=2, cap_feat_dim=32, in_channels=16)
# Every module ComfyUI's toy NextDiT has at the LoRA's shape (its t_embedder is narrower, see the docstring).
KEYS = [k for k in SPEC.module_keys() if not k[1].startswith("t_embedder")]


def diffusers_model(spec: ZitSpec = SPEC, std: float = 0.05) -> torch.nn.Module:
    """The diffusers transformer at `spec` with seeded weights."""
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False):
        torch.manual_seed(0)
        model = build_transformer(spec, device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * std)
    return model.eval().requires_grad_(False)


@pytest.fixture(autouse=True)
def _like_comfyui():
    """Nodes execute under torch.inference_mode() in ComfyUI; so do these tests."""
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def dmodel():
    return diffusers_model()


@pytest.fixture(scope="module")
def base(dmodel):
    return host.comfy_model(SPEC, to_comfy_state_dict(dmodel.state_dict()))


@pytest.fixture(scope="module")
def base_bf16(dmodel):
    return host.comfy_model(SPEC, to_comfy_state_dict(dmodel.state_dict()), dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """A fresh loras folder as ComfyUI's only one; yields a writer: (file name, Lora, dialect) -> name."""
    folder = tmp_path_factory.mktemp("loras")
    saved = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(folder)], saved[1])
    folder_paths.filename_list_cache.pop("loras", None)

    def write(name: str, lora: Lora, dialect: str = "aitoolkit") -> str:
        writing.write_lora(lora, folder / name, dialect)
        return name

    write.folder = folder
    yield write
    folder_paths.folder_names_and_paths["loras"] = saved
    folder_paths.filename_list_cache.pop("loras", None)


def lora_for(seed: int, rank: int = 4, keys=KEYS, dtype=torch.float32) -> Lora:
    return random_lora(rank, SPEC, keys=keys, seed=seed, dtype=dtype, std=0.05)


def state(patcher) -> dict[str, torch.Tensor]:
    return host.patched_state(patcher)


def assert_states_equal(got: dict, want: dict, keys=None) -> None:
    for k in keys or want:
        assert torch.equal(got[k], want[k]), k


def weight_key(key) -> str:
    return f"{comfy_name(key)}.weight"


def rows(key, spec=SPEC) -> slice:
    i = {"q": 0, "k": 1, "v": 2}.get(key[1]) if key[0] != BASE else None
    return slice(None) if i is None else slice(i * spec.dim, (i + 1) * spec.dim)


def core_load(model, name: str, strength: float):
    return core_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]

