"""The Z-Image-Turbo module map: blocks, components, shapes and the names each layout gives them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property

COMPONENTS: tuple[str, ...] = ("adaLN", "q", "k", "v", "out", "w1", "w2", "w3")
ATTENTION: tuple[str, ...] = ("q", "k", "v", "out")
FFN: tuple[str, ...] = ("w1", "w2", "w3")

MAIN_BLOCKS: tuple[str, ...] = tuple(f"L{i:02d}" for i in range(30))
REFINER_BLOCKS: tuple[str, ...] = ("NR0", "NR1", "CR0", "CR1")
BASE = "BASE"
# The block-weight vector order: BASE (modules in no block), 30 main layers, 2 noise + 2 context refiners.
VECTOR_BLOCKS: tuple[str, ...] = (BASE, *MAIN_BLOCKS, *REFINER_BLOCKS)

# diffusers (and ai-toolkit / DiffSynth / kohya) name of each component inside a block.
DIFFUSERS_SUFFIX: dict[str, str] = {
    "adaLN": "adaLN_modulation.0",
    "q": "attention.to_q",
    "k": "attention.to_k",
    "v": "attention.to_v",
    "out": "attention.to_out.0",
    "w1": "feed_forward.w1",
    "w2": "feed_forward.w2",
    "w3": "feed_forward.w3",
}
# ComfyUI's NextDiT name of each component; q, k and v are row slices 0, 1, 2 of the fused qkv.
COMFY_SUFFIX: dict[str, str] = {
    "adaLN": "adaLN_modulation.0",
    "q": "attention.qkv",
    "k": "attention.qkv",
    "v": "attention.qkv",
    "out": "attention.out",
    "w1": "feed_forward.w1",
    "w2": "feed_forward.w2",
    "w3": "feed_forward.w3",
}
QKV_SLICE: dict[str, int] = {"q": 0, "k": 1, "v": 2}

# Linear modules outside every block (they take the vector's BASE weight): diffusers name -> ComfyUI name.
BASE_MODULES: dict[str, str] = {
    "all_x_embedder.2-1": "x_embedder",
    "all_final_layer.2-1.linear": "final_layer.linear",
    "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1",
    "t_embedder.mlp.0": "t_embedder.mlp.0",
    "t_embedder.mlp.2": "t_embedder.mlp.2",
    "cap_embedder.1": "cap_embedder.1",
}

ModuleKey = tuple[str, str]  # (block, component); for BASE modules the component is the diffusers name


@dataclass(frozen=True)
class ZitSpec:
    """Sizes of a Z-Image transformer; the defaults are Z-Image-Turbo's."""

    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    cap_feat_dim: int = 2560
    in_channels: int = 16
    patch_size: int = 2

    @property
    def ffn_hidden(self) -> int:
        return int(self.dim / 3 * 8)

    @property
    def adaln_in(self) -> int:
        return min(self.dim, 256)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def blocks(self) -> list[str]:
        """Every block this model has, in vector order (BASE excluded)."""
        refiners = [f"{kind}{i}" for kind in ("NR", "CR") for i in range(self.n_refiner_layers)]
        return [f"L{i:02d}" for i in range(self.n_layers)] + refiners

    def components(self, block: str) -> tuple[str, ...]:
        """Components of a block: context refiners have no adaLN; BASE lists its own modules."""
        if block == BASE:
            return tuple(BASE_MODULES)
        return COMPONENTS[1:] if block.startswith("CR") else COMPONENTS

    def module_keys(self) -> list[ModuleKey]:
        """Every LoRA-targetable linear module: blocks first, BASE modules last."""
        keys = [(b, c) for b in self.blocks() for c in self.components(b)]
        return keys + [(BASE, name) for name in BASE_MODULES]

    @cached_property
    def _module_set(self) -> frozenset[ModuleKey]:
        return frozenset(self.module_keys())

    def has_module(self, key: ModuleKey) -> bool:
        return key in self._module_set

    def shape(self, key: ModuleKey) -> tuple[int, int]:
        """(out_features, in_features) of the linear a LoRA on this module patches."""
        block, c = key
        d, h = self.dim, self.ffn_hidden
        patch_ch = self.patch_size * self.patch_size * self.in_channels
        if block == BASE:
            return {
                "all_x_embedder.2-1": (d, patch_ch),
                "all_final_layer.2-1.linear": (patch_ch, d),
                "all_final_layer.2-1.adaLN_modulation.1": (d, self.adaln_in),
                "t_embedder.mlp.0": (1024, 256),
                "t_embedder.mlp.2": (self.adaln_in, 1024),
                "cap_embedder.1": (d, self.cap_feat_dim),
            }[c]
        if c == "adaLN":
            return (4 * d, self.adaln_in)
        if c in ("w1", "w3"):
            return (h, d)
        if c == "w2":
            return (d, h)
        return (d, d)


ZIT = ZitSpec()


def block_path(block: str) -> str:
    """`L07` -> `layers.7`, `NR1` -> `noise_refiner.1`, `CR0` -> `context_refiner.0`."""
    if block.startswith("L"):
        return f"layers.{int(block[1:])}"
    kind = {"NR": "noise_refiner", "CR": "context_refiner"}[block[:2]]
    return f"{kind}.{int(block[2:])}"


def block_from_path(kind: str, index: int) -> str:
    """Inverse of block_path: ("layers", 7) -> `L07`."""
    if kind == "layers":
        return f"L{index:02d}"
    return {"noise_refiner": "NR", "context_refiner": "CR"}[kind] + str(index)


def diffusers_name(key: ModuleKey) -> str:
    """The diffusers module name of a canonical key, e.g. `layers.3.attention.to_q`."""
    block, c = key
    if block == BASE:
        return c
    return f"{block_path(block)}.{DIFFUSERS_SUFFIX[c]}"


def comfy_name(key: ModuleKey) -> str:
    """The ComfyUI NextDiT module name (q/k/v share `attention.qkv`)."""
    block, c = key
    if block == BASE:
        return BASE_MODULES[c]
    return f"{block_path(block)}.{COMFY_SUFFIX[c]}"
