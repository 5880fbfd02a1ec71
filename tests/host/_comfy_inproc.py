"""ComfyUI in this test process: find a checkout, import it CPU-only, load the pack, build a toy Z-Image.

The checkout is COMFYUI_PATH, or the ComfyUI folder this repo sits in (ComfyUI/custom_nodes/<repo>).
ComfyUI is imported with its default (unparsed) arguments plus `cpu`, like its own tests-unit. ComfyUI's
audio models import torchaudio at import time; where the installed wheel does not load (a CUDA-version
mismatch on a CPU machine) an empty stand-in is installed instead: Z-Image never calls it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PACK = "zit_trainer_pack"  # the module name the pack is imported under (ComfyUI derives one from the folder)


def find_comfyui() -> Path | None:
    """The ComfyUI checkout to test against, or None."""
    env = os.environ.get("COMFYUI_PATH")
    candidates = [Path(env)] if env else []
    if REPO.parent.name == "custom_nodes":
        candidates.append(REPO.parent.parent)
    return next((p.resolve() for p in candidates if (p / "comfy" / "model_patcher.py").is_file()), None)


def skip_reason() -> str:
    """Why the host tests cannot run here."""
    return ("no ComfyUI checkout: set COMFYUI_PATH to one (or put this repo in ComfyUI/custom_nodes/) "
            "to run the host tests")


class _TorchaudioStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty `torchaudio` modules (ComfyUI imports it at import time; Z-Image never uses it)."""

    def find_spec(self, name: str, path: Any = None,
                  target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name == "torchaudio" or name.startswith("torchaudio."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def _torchaudio_or_stand_in() -> None:
    if "torchaudio" in sys.modules:
        return
    try:
        import torchaudio  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure to load the wheel
        for name in [n for n in sys.modules if n == "torchaudio" or n.startswith("torchaudio.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _TorchaudioStandIn())


def prepare(root: Path) -> None:
    """Put ComfyUI at `root` first on sys.path, CPU-only, with torchaudio loadable; imports nothing else."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    own = sys.modules.get("nodes")
    if own is not None and not str(getattr(own, "__file__", "")).startswith(str(root)):
        del sys.modules["nodes"]  # our nodes/ package, imported top-level: ComfyUI needs its nodes.py
    _torchaudio_or_stand_in()
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


def setup_or_skip() -> tuple[Path, types.ModuleType]:
    """At a test module's top: (the ComfyUI checkout, the pack) after `setup`, or the whole module skipped
    with the reason when there is no checkout. Imports of ComfyUI or the pack go below the call."""
    root = find_comfyui()
    if root is None:
        import pytest

        pytest.skip(skip_reason(), allow_module_level=True)
    return root, setup(root)


def setup(root: Path) -> types.ModuleType:
    """Import ComfyUI from `root` on the CPU and the pack under PACK; returns the pack module."""
    prepare(root)
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401
    import folder_paths  # noqa: F401

    import nodes  # noqa: F401

    return load_pack()


def load_pack() -> types.ModuleType:
    """The repo imported as a package under PACK, the way ComfyUI imports a custom node folder."""
    if PACK in sys.modules:
        return sys.modules[PACK]
    spec = importlib.util.spec_from_file_location(PACK, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module


def comfy_unet_config(spec: Any) -> dict:
    """ComfyUI's Z-Image unet_config (as model_detection builds it at dim 3840) for a ZitSpec's sizes."""
    head = spec.dim // spec.n_heads
    return {
        "image_model": "lumina2", "patch_size": spec.patch_size, "in_channels": spec.in_channels,
        "dim": spec.dim, "cap_feat_dim": spec.cap_feat_dim, "n_layers": spec.n_layers,
        "n_refiner_layers": spec.n_refiner_layers, "qk_norm": True, "n_heads": spec.n_heads,
        "n_kv_heads": spec.n_heads, "axes_dims": [head // 4, head * 3 // 8, head * 3 // 8],
        "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
        "z_image_modulation": True, "time_scale": 1000.0,
        "multiple_of": 1,  # ZIT's FFN width (dim * 8/3) is a multiple of 256 only at full size
    }


def comfy_model(spec: Any, weights: dict, seed: int = 0, dtype: Any = None) -> Any:
    """A ModelPatcher around ComfyUI's Z-Image NextDiT at `spec`'s sizes, holding `weights` (ComfyUI names).

    Weights missing from `weights` or of another shape get seeded random values: below dim 1024 ComfyUI's
    t_embedder is narrower than diffusers' (min(dim, 1024) hidden, 256 out instead of 1024 and min(dim, 256)).
    """
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    config = comfy.supported_models.ZImage(comfy_unet_config(spec))
    config.set_inference_dtype(dtype or torch.float32, None)
    model = config.get_model({}, "")
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, t in model.diffusion_model.state_dict().items():
        given = weights.get(key)
        ok = given is not None and tuple(given.shape) == tuple(t.shape)
        state[key] = given if ok else torch.randn(t.shape, generator=gen) * 0.05
    model.diffusion_model.load_state_dict(state)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def patched_state(patcher: Any) -> dict:
    """The MODEL's diffusion weights after ComfyUI patches them (patch_model), copied; then unpatched."""
    patcher.patch_model()
    try:
        return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    finally:
        patcher.unpatch_model()
