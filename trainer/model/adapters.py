"""peft LoRA adapters on the transformer: inject, load, stack, enable/disable, read back."""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import ZImageTransformer2DModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn

from ..lora.canonical import Lora, LoraError, LoraModule
from ..lora.spec import ZitSpec, diffusers_name
from .headers import _names
from .transformer import model_spec

_ATTN = r"attention\.(?:to_q|to_k|to_v|to_out\.0)"
_FFN = r"feed_forward\.w[123]"
# Full-name regexes (re.fullmatch against model.named_modules()); never suffixes.
TARGET_PRESETS: dict[str, str] = {
    "aitoolkit": rf"layers\.\d+\.(?:{_ATTN}|{_FFN}|adaLN_modulation\.0)",
    "diffsynth": rf"(?:layers|noise_refiner|context_refiner)\.\d+\.(?:{_ATTN}|{_FFN})",
    "attention": rf"layers\.\d+\.{_ATTN}",
}


@dataclass
class _AdapterState:
    trainable: bool
    enabled: bool = True
    strength: float = 1.0


def _adapters(model: nn.Module) -> dict[str, _AdapterState]:
    if not hasattr(model, "_zit_adapters"):
        model._zit_adapters = {}
    return model._zit_adapters


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer))


def _base_linear(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, LoraLayer) else module


def resolve_targets(model: ZImageTransformer2DModel, targets: str) -> list[str]:
    """Full names of the Linear modules selected by a preset name or a full-name regex, in model order."""
    pattern = TARGET_PRESETS.get(targets, targets)
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise LoraError(f"LoRA targets {pattern!r}: invalid regex ({e})") from e
    known = {diffusers_name(k) for k in model_spec(model).module_keys()}
    matched = [(n, m) for n, m in model.named_modules() if regex.fullmatch(n)]
    names = [n for n, m in matched if n in known and isinstance(_base_linear(m), nn.Linear)]
    if not names:
        other = _names([f"{n} ({type(m).__name__})" for n, m in matched])
        raise LoraError(f"LoRA targets {targets!r} select no Linear module of the transformer"
                        + (f"; they match only {other}" if other else ""))
    return names


def _exact(names: Iterable[str]) -> str:
    return "(?:" + "|".join(re.escape(n) for n in names) + ")"


def _adapter_params(layer: LoraLayer, name: str) -> Iterator[nn.Parameter]:
    for attr in layer.adapter_layer_names:
        holder = getattr(layer, attr)
        if name in holder:
            item = holder[name]
            yield from [item] if isinstance(item, nn.Parameter) else item.parameters()


def _apply_adapter_state(model: nn.Module) -> None:
    """Activate the enabled adapters on every LoRA layer, set strengths, freeze all but trainable adapters."""
    states = _adapters(model)
    active = [n for n, s in states.items() if s.enabled]
    for _, layer in _lora_layers(model):
        layer.set_adapter(active)
        for name, state in states.items():
            layer.set_scale(name, state.strength)
            for p in _adapter_params(layer, name):
                p.requires_grad_(state.trainable)


def _add_adapter(model: nn.Module, config: LoraConfig, name: str, state: _AdapterState) -> None:
    if name in _adapters(model):
        raise LoraError(f"the model already has an adapter named {name!r}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Already found a `peft_config` attribute", UserWarning)
        model.add_adapter(config, adapter_name=name)
    _adapters(model)[name] = state
    _apply_adapter_state(model)


def inject_lora(
    model: ZImageTransformer2DModel,
    rank: int,
    alpha: float,
    targets: str = "aitoolkit",
    init: Literal["default", "gaussian"] = "default",
    adapter_name: str = "zit",
) -> list[str]:
    """Add a trainable peft LoRA (B zero-initialised, so no change at step 0); returns the targeted names."""
    if init not in ("default", "gaussian"):
        raise LoraError(f"LoRA init {init!r}: expected 'default' or 'gaussian'")
    names = resolve_targets(model, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=_exact(names),
                        init_lora_weights=True if init == "default" else "gaussian")
    _add_adapter(model, config, adapter_name, _AdapterState(trainable=True))
    return names


def _configured_scale(layer: LoraLayer, name: str) -> float:
    r = layer.r[name]
    return layer.lora_alpha[name] / (math.sqrt(r) if layer.use_rslora.get(name, False) else r)


def lora_from_peft(
    model: ZImageTransformer2DModel, adapter_name: str = "zit", spec: ZitSpec | None = None
) -> Lora:
    """The canonical float32 Lora of one peft adapter (alpha/r folded into B; strength not applied)."""
    spec = spec or model_spec(model)
    keys = {diffusers_name(k): k for k in spec.module_keys()}
    modules = {}
    for name, layer in _lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        if name not in keys:
            raise LoraError(f"adapter {adapter_name!r} is on {name}, which is not a Z-Image LoRA module")
        a = layer.lora_A[adapter_name].weight.detach().to("cpu", torch.float32, copy=True)
        b = layer.lora_B[adapter_name].weight.detach().to("cpu", torch.float32, copy=True)
        modules[keys[name]] = LoraModule(a, b * _configured_scale(layer, adapter_name))
    if not modules:
        raise LoraError(f"the model has no LoRA adapter named {adapter_name!r}")
    return Lora(modules, {}, spec)


def _check_fits(model: nn.Module, lora: Lora) -> dict[str, LoraModule]:
    """The lora's modules by diffusers name, after checking each exists in the model with matching shape."""
    by_name = {}
    for key, module in lora.modules.items():
        name = diffusers_name(key)
        try:
            linear = _base_linear(model.get_submodule(name))
        except AttributeError:
            raise LoraError(f"LoRA module {name} does not exist in this transformer") from None
        out_f, in_f = linear.out_features, linear.in_features  # not weight.shape: packed for nf4/int8
        if (out_f, in_f) != (module.b.shape[0], module.a.shape[1]):
            raise LoraError(f"LoRA module {name}: dW is {module.b.shape[0]}x{module.a.shape[1]} but the "
                            f"weight is {out_f}x{in_f}")
        by_name[name] = module
    return by_name


def load_lora_into_peft(
    model: ZImageTransformer2DModel, lora: Lora, adapter_name: str, trainable: bool, strength: float = 1.0
) -> None:
    """Add a canonical Lora as a peft adapter (scale 1, per-module ranks), active at `strength`."""
    by_name = _check_fits(model, lora)
    if not by_name:
        raise LoraError(f"LoRA for adapter {adapter_name!r} has no modules")
    ranks = {n: m.rank for n, m in by_name.items()}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    odd = {re.escape(n): r for n, r in ranks.items() if r != rank}
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=_exact(by_name), rank_pattern=odd,
                        alpha_pattern=odd, init_lora_weights=False)
    _add_adapter(model, config, adapter_name, _AdapterState(trainable=trainable, strength=strength))
    with torch.no_grad():
        for name, module in by_name.items():
            layer = model.get_submodule(name)
            layer.lora_A[adapter_name].weight.copy_(module.a)
            layer.lora_B[adapter_name].weight.copy_(module.b)


def attach_frozen_adapter(
    model: ZImageTransformer2DModel, lora: Lora, strength: float = 1.0, name: str = "adapter"
) -> None:
    """Stack a frozen adapter (e.g. the ZIT training adapter) under the trainable LoRA, active together."""
    load_lora_into_peft(model, lora, name, trainable=False, strength=strength)


def set_adapter_enabled(model: ZImageTransformer2DModel, name: str, enabled: bool) -> None:
    """Turn one adapter on or off, leaving the others as they are."""
    states = _adapters(model)
    if name not in states:
        raise LoraError(f"the model has no adapter named {name!r}")
    states[name].enabled = enabled
    _apply_adapter_state(model)


@contextmanager
def adapters_disabled(model: ZImageTransformer2DModel, names: Iterable[str] | None = None) -> Iterator[None]:
    """Within the block the named adapters (default: all, i.e. the frozen base) are off; restored after."""
    states = _adapters(model)
    names = list(states) if names is None else list(names)
    unknown = [n for n in names if n not in states]
    if unknown:
        raise LoraError(f"the model has no adapter named {unknown[0]!r}")
    was = {n: states[n].enabled for n in names}
    for n in names:
        states[n].enabled = False
    _apply_adapter_state(model)
    try:
        yield
    finally:
        for n, enabled in was.items():
            states[n].enabled = enabled
        _apply_adapter_state(model)


def adapter_disabled(model: ZImageTransformer2DModel, name: str = "adapter") -> AbstractContextManager[None]:
    """Within the block adapter `name` is off (previews = base + trained LoRA); restored afterwards."""
    return adapters_disabled(model, [name])


