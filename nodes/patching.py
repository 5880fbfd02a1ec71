"""ComfyUI patch helpers: a canonical ZIT Lora (or a LyCORIS file, see lycoris_patches) as exact ComfyUI
weight patches, attached/removed by identity.

Patch format (what `comfy.lora.load_lora` builds for a ZIT LoRA file):
- key `diffusion_model.<ComfyUI module>.weight`; q, k and v are offset patches on the fused qkv weight,
  `(key, (0, offset, dim))` with offsets 0, dim and 2*dim (the rows of q, k and v);
- value `comfy.weight_adapter.LoRAAdapter(loaded_keys, (up, down, alpha, mid, dora_scale, reshape))` with
  up = B, down = A and alpha None: ComfyUI then uses scale 1.0, and the canonical B already holds the
  file's alpha / rank. (ComfyUI versions before weight adapters take the tuple `("lora", (...))`.)
- the strength and each module's block/component weight go into `add_patches`' strength_patch, one call
  per distinct weight, so ComfyUI computes `(strength * weight) * (up @ down)` in float32 exactly as it
  does for its own loader; a module of weight 0 gets no patch at all.

LoKr, LoHa and full-diff files are read as a DeltaFile (`read_adapter_file` tells them apart by the tensor
names in the header) and become ComfyUI's own LoKr / LoHa / diff patches (lycoris_patches.py), weighted the
same way.

Attach/remove: `attach` records the adapter objects it added under a name in `model_options`;
`remove_attachment` returns a clone whose patch lists no longer hold those objects (found by identity), with
a fresh `patches_uuid` so ComfyUI re-patches the weights. ComfyUI computes all patches of a weight on a
float32 copy of the original weight, so after removal the patched weights are bit-identical to the MODEL
before the attach.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import OrderedDict
from typing import Any

import folder_paths

from ..trainer.errors import ZitError
from ..trainer.lora.any_file import kinds_text, read_any
from ..trainer.lora.blocks import BlockWeights
from ..trainer.lora.canonical import Lora, LoraModule
from ..trainer.lora.lycoris import DeltaFile
from ..trainer.lora.spec import BASE, QKV_SLICE, ModuleKey, ZitSpec, comfy_name, diffusers_name

PREFIX = "diffusion_model."
# model_options key: {name: {"patches": (adapter, ...), "file": str, "strength": float}}
ATTACHED = "zit_attached"

PatchKey = str | tuple[str, tuple[int, int, int]]
AdapterFile = Lora | DeltaFile  # a LoRA, or a LyCORIS file (LoKr, LoHa, full diff; see lycoris_patches)


def model_spec(patcher: Any) -> ZitSpec:
    """The ZitSpec of a ComfyUI MODEL; ZitError when it is not Z-Image (NextDiT with Z-Image modulation)."""
    model = getattr(patcher, "model", None)
    config = getattr(getattr(model, "model_config", None), "unet_config", None) or {}
    if config.get("image_model") != "lumina2" or not config.get("z_image_modulation"):
        kind = f"{type(model).__name__}, image_model {config.get('image_model')!r}"
        raise ZitError(f"this MODEL is not Z-Image ({kind}); the ZIT nodes patch Z-Image's NextDiT only")
    if config.get("n_kv_heads", config["n_heads"]) != config["n_heads"]:
        raise ZitError("this Z-Image MODEL has grouped key/value heads; the ZIT LoRA layout needs "
                       "n_kv_heads = n_heads")
    return ZitSpec(dim=config["dim"], n_layers=config["n_layers"],
                   n_refiner_layers=config.get("n_refiner_layers", 2), n_heads=config["n_heads"],
                   cap_feat_dim=config["cap_feat_dim"], in_channels=config.get("in_channels", 16),
                   patch_size=config.get("patch_size", 2))


def patch_key(key: ModuleKey, spec: ZitSpec) -> PatchKey:
    """A module's ComfyUI patch key: weight key, or (qkv weight key, (0, row offset, dim)) for q/k/v."""
    weight = f"{PREFIX}{comfy_name(key)}.weight"
    if key[0] != BASE and key[1] in QKV_SLICE:
        return weight, (0, QKV_SLICE[key[1]] * spec.dim, spec.dim)
    return weight


def adapter(m: LoraModule) -> Any:
    """The ComfyUI patch value of one module: a LoRAAdapter (up = B, down = A, alpha None = scale 1)."""
    weights = (m.b, m.a, None, None, None, None)
    try:
        from comfy.weight_adapter import LoRAAdapter
    except ImportError:  # ComfyUI before weight adapters: load_lora's tuple form
        return ("lora", weights)
    return LoRAAdapter(set(), weights)


def lora_patches(
    lora: Lora, spec: ZitSpec, weights: BlockWeights | None = None
) -> dict[float, dict[PatchKey, Any]]:
    """Patch dicts for ModelPatcher.add_patches grouped by module weight; weight-0 modules get no patch."""
    groups: dict[float, dict[PatchKey, Any]] = {}
    for key, m in lora.modules.items():
        w = 1.0 if weights is None else weights.weight(key)
        if w != 0:
            groups.setdefault(w, {})[patch_key(key, spec)] = adapter(m)
    return groups


def file_patches(
    adapter_file: AdapterFile, spec: ZitSpec, weights: BlockWeights | None = None
) -> dict[float, dict[PatchKey, Any]]:
    """add_patches dicts of a LoRA or a LyCORIS file, grouped by strength factor (weight-0: no patch)."""
    if isinstance(adapter_file, DeltaFile):
        from .lycoris_patches import delta_patches

        return delta_patches(adapter_file, spec, weights)
    return lora_patches(adapter_file, spec, weights)


def _dw_shape(module: Any) -> tuple[int, int]:
    """(out, in) of a module's dW: a LoraModule's from its factors, a DeltaModule's as read."""
    return (module.b.shape[0], module.a.shape[1]) if isinstance(module, LoraModule) else module.shape


def _check_fits(patcher: Any, adapter_file: AdapterFile, spec: ZitSpec) -> None:
    """ZitError naming the module when a module has no weight of its shape in the MODEL."""
    shapes = {k: tuple(v.shape) for k, v in patcher.model_state_dict().items()}
    kind = "LyCORIS" if isinstance(adapter_file, DeltaFile) else "LoRA"
    for key, m in adapter_file.modules.items():
        pk = patch_key(key, spec)
        out_f, in_f = _dw_shape(m)
        if isinstance(pk, str):
            weight, need = pk, (out_f, in_f)
        else:  # a row slice of the fused qkv: dW has the slice's rows, the weight three times as many
            weight, need = pk[0], ((3 * pk[1][2], in_f) if out_f == pk[1][2] else None)
        have = shapes.get(weight)
        if have is None or have != need:
            found = "is missing" if have is None else f"is {'x'.join(map(str, have))}"
            raise ZitError(f"{kind} module {diffusers_name(key)}: dW is {out_f}x{in_f} but this MODEL's "
                           f"{weight} {found}: the {kind} file is for a different model")


def attachments(patcher: Any) -> dict[str, dict[str, Any]]:
    """What `attach` recorded on this MODEL: name -> {"patches", "file", "strength"}."""
    return patcher.model_options.get(ATTACHED, {})


def attach(patcher: Any, lora: AdapterFile, strength: float = 1.0, weights: BlockWeights | None = None,
           name: str | None = None, source: str = "") -> Any:
    """A clone of `patcher` with `lora` (LoRA or LyCORIS) as patches at strength x module weight,
    recorded under `name`."""
    spec = model_spec(patcher)
    if name is not None and name in attachments(patcher):
        raise ZitError(f"the {name.replace('_', ' ')} is already attached to this MODEL "
                       f"({attachments(patcher)[name]['file']}); remove it first")
    _check_fits(patcher, lora, spec)
    clone = patcher.clone()
    added = []
    if strength != 0:
        for w, patches in file_patches(lora, spec, weights).items():
            added += [patches[k] for k in clone.add_patches(patches, strength * w)]
    if name is not None:
        record = {"patches": tuple(added), "file": source, "strength": strength}
        clone.model_options[ATTACHED] = {**attachments(clone), name: record}
    return clone


def remove_attachment(patcher: Any, name: str) -> Any:
    """A clone of `patcher` without the patches recorded under `name` (by identity), new patches_uuid."""
    label = name.replace("_", " ")
    record = attachments(patcher).get(name)
    if record is None:
        raise ZitError(f"nothing to remove: no {label} was attached to this MODEL by a ZIT attach node. "
                       f"If the {label} is baked into the model's weights, use mode 'subtract' with its "
                       f"file.")
    ids = {id(a) for a in record["patches"]}
    clone = patcher.clone()
    removed = 0
    for key in list(clone.patches):
        kept = [p for p in clone.patches[key] if id(p[1]) not in ids]
        removed += len(clone.patches[key]) - len(kept)
        if kept:
            clone.patches[key] = kept
        else:
            del clone.patches[key]
    if removed != len(ids):
        raise ZitError(f"the {label} ({record['file']}) was attached, but {len(ids) - removed} of its "
                       f"{len(ids)} patches are no longer on this MODEL; cannot remove it exactly")
    clone.patches_uuid = uuid.uuid4()
    clone.model_options[ATTACHED] = {k: v for k, v in attachments(clone).items() if k != name}
    return clone


def subtract(patcher: Any, lora: AdapterFile, strength: float, name: str) -> Any:
    """A clone with `lora` added at -strength: cancels a baked-in copy (only approximately in bf16/fp8)."""
    if name in attachments(patcher):
        label = name.replace("_", " ")
        source = attachments(patcher)[name]["file"]
        raise ZitError(f"the {label} is attached to this MODEL as a patch ({source}): use mode 'exact', "
                       f"which removes it bit-exactly")
    return attach(patcher, lora, -strength)


_CACHE: OrderedDict[tuple, AdapterFile] = OrderedDict()
_CACHE_SIZE = 4
_CACHE_LOCK = threading.Lock()


def read_adapter_file(lora_name: str, spec: ZitSpec | None = None) -> AdapterFile:
    """A file in the loras folders as a Lora, or a DeltaFile when it holds LoKr / LoHa / diff tensors;
    cached by (path, mtime, size, spec). A DeltaFile's tensors stay in the file until patches need them."""
    path = folder_paths.get_full_path_or_raise("loras", lora_name)
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size, spec)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    loaded = read_any(path, spec=spec)
    with _CACHE_LOCK:
        _CACHE[key] = loaded
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return loaded


def read_lora_file(lora_name: str, spec: ZitSpec | None = None, rank: int | None = None) -> Lora:
    """A file in the loras folders as a Lora; a LyCORIS file becomes its best rank-`rank` LoRA
    (ZitError naming the file without a rank)."""
    loaded = read_adapter_file(lora_name, spec)
    if isinstance(loaded, Lora):
        return loaded
    if rank is None:
        raise ZitError(f"{lora_name}: a LyCORIS file ({kinds_text(loaded)}); this node needs a LoRA: "
                       f"give a rank to convert it to")
    from ..trainer.lora.lycoris import delta_to_lora

    return delta_to_lora(loaded, rank=rank)[0]

