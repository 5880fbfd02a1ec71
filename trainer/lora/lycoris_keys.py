"""LyCORIS (LoKr, LoHa, full diff) tensor names for Z-Image: which module, which part, shapes, refusals.

A tensor name is `<module prefix>.<part>`; the prefix is any of the names ComfyUI maps for Z-Image
(`lycoris_` or `lora_unet_` + the module name with dots as underscores, `diffusion_model.` /
`transformer.` / no prefix + the dotted name; also VideoX-Fun's `lora_unet__`), in the diffusers layout
(`attention.to_q`) or ComfyUI's (fused `attention.qkv`, `attention.out`). Everything here works from
names and shapes only (a safetensors header is enough), so a bad file is refused before any tensor is read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .canonical import LoraError
from .formats import _FOREIGN, QKV, _names
from .spec import ModuleKey, ZitSpec

KINDS: tuple[str, ...] = ("lokr", "loha", "full", "lora")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
# Plain LoRA modules may sit beside LoKr/LoHa ones in a LyCORIS file (per-module algorithm presets).
_LORA_SUFFIXES = {".lora_down.weight": "lora_down", ".lora_up.weight": "lora_up",
                  ".lora_A.weight": "lora_down", ".lora_B.weight": "lora_up"}
_KIND_OF = {**dict.fromkeys(LOKR_PARTS, "lokr"), **dict.fromkeys(LOHA_PARTS, "loha"), "diff": "full",
            "lora_down": "lora", "lora_up": "lora"}
# Parts we know but refuse, with the reason.
_REFUSED = {
    "dora_scale": "a DoRA magnitude vector: the weight it gives depends on the model's own weights, so the "
                  "delta cannot be computed from the file alone (not supported)",
    "diff_b": "a bias delta: a LoRA carries no bias, and dropping it would change the model's output "
              "(not supported)",
    "lokr_t2": "a LoKr Tucker core: LyCORIS writes one only for convolutions, and ComfyUI cannot apply it to "
               "a Linear layer (its torch.kron of the einsum result fails and the module is skipped)",
    "lora_mid.weight": "a LoCon Tucker middle factor, which only convolutions use (Z-Image has none)",
    "w_norm": "a norm-layer weight, not a linear-layer delta (not supported)",
    "b_norm": "a norm-layer bias, not a linear-layer delta (not supported)",
    "set_weight": "a weight replacement, not a delta (not supported)",
    "reshape_weight": "a weight reshape, not a delta (not supported)",
    "oft_blocks": "an OFT/BOFT adapter (not supported: only LoKr, LoHa, full diff and LoRA)",
    "oft_diag": "an OFT adapter (not supported: only LoKr, LoHa, full diff and LoRA)",
    "rescale": "an OFT/BOFT rescale vector (not supported: only LoKr, LoHa, full diff and LoRA)",
}
_READ_PREFIXES = (("lycoris_", True), ("lora_unet__", True), ("lora_unet_", True),
                  ("diffusion_model.", False), ("transformer.", False), ("base_model.model.", False),
                  ("", False))

Shapes = Callable[[str], tuple[int, ...]]


def split_key(key: str) -> tuple[str, str]:
    """(module prefix, part) of a tensor name: `x.lokr_w1` -> (`x`, `lokr_w1`), `x.lora_up.weight` ->
    (`x`, `lora_up`), `x.lora_mid.weight` -> (`x`, `lora_mid.weight`)."""
    for suffix, part in _LORA_SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    if key.endswith(".lora_mid.weight"):
        return key[: -len(".lora_mid.weight")], "lora_mid.weight"
    prefix, _, part = key.rpartition(".")
    return prefix, part


def is_lycoris(keys: Iterable[str]) -> bool:
    """True when any tensor is a LoKr (`lokr_*`), LoHa (`hada_*`) or full-diff (`diff`, `diff_b`) part."""
    for k in keys:
        part = split_key(k)[1]
        if part.startswith(("lokr_", "hada_")) or part in ("diff", "diff_b"):
            return True
    return False


@dataclass
class Group:
    """The tensors of one adapted module: its prefix, target, kind and part -> tensor name."""

    prefix: str
    target: ModuleKey  # canonical key, or (block, "qkv") for a fused ComfyUI qkv module
    kind: str = ""
    parts: dict[str, str] = field(default_factory=dict)
    alpha: str | None = None


def _target(prefix: str, key: str, spec: ZitSpec, source: str) -> ModuleKey:
    for pattern, what in _FOREIGN:
        if pattern.search(prefix):
            raise LoraError(f"{source}: key {key!r}: this looks like {what}")
    dotted, underscored = _names(spec)
    for start, flat in _READ_PREFIXES:
        if prefix.startswith(start):
            name = prefix[len(start):]
            table = underscored if flat else dotted
            if name in table:
                return table[name]
    raise LoraError(f"{source}: key {key!r}: module {prefix!r} does not exist in Z-Image-Turbo "
                    f"({spec.n_layers} layers, {spec.n_refiner_layers} noise/context refiners)")


def group_keys(keys: Iterable[str], spec: ZitSpec, source: str) -> dict[str, Group]:
    """Module prefix -> Group, refusing unknown or unsupported parts, foreign models and mixed kinds."""
    groups: dict[str, Group] = {}
    for k in keys:
        prefix, part = split_key(k)
        if part in _REFUSED:
            raise LoraError(f"{source}: key {k!r}: {_REFUSED[part]}")
        if part != "alpha" and part not in _KIND_OF:
            what = ("an unknown LoKr part" if part.startswith("lokr_") else
                    "an unknown LoHa part" if part.startswith("hada_") else
                    "not a LoKr, LoHa, full-diff or LoRA tensor")
            raise LoraError(f"{source}: key {k!r}: {what} (part {part!r})")
        g = groups.get(prefix) or groups.setdefault(prefix, Group(prefix, _target(prefix, k, spec, source)))
        if part == "alpha":
            g.alpha = k
            continue
        kind = _KIND_OF[part]
        if g.kind and g.kind != kind:
            other = next(iter(g.parts.values()))
            raise LoraError(f"{source}: key {k!r}: module {prefix!r} mixes a {kind} part with the "
                            f"{g.kind} part {other!r}; one module takes one adapter")
        g.kind = kind
        g.parts[part] = k
    for g in groups.values():
        if not g.kind:
            raise LoraError(f"{source}: key {g.alpha!r}: an alpha without any adapter tensor")
    return groups


def _mat(shapes: Shapes, key: str, source: str, what: str = "factor") -> tuple[int, int]:
    shape = tuple(shapes(key))
    if len(shape) == 4:
        raise LoraError(f"{source}: key {key!r}: a 4-D {what} {shape} is a convolution part; "
                        f"every adapted Z-Image layer is Linear")
    if len(shape) != 2:
        raise LoraError(f"{source}: key {key!r}: a LyCORIS {what} must be a matrix, got shape {shape}")
    return shape  # type: ignore[return-value]


def _tucker(shapes: Shapes, key: str, source: str) -> tuple[int, int]:
    """(i, j) of a Tucker core; only (i, j, 1, 1) is a Linear layer's (ComfyUI's einsum needs 4-D)."""
    shape = tuple(shapes(key))
    if len(shape) != 4 or shape[2:] != (1, 1):
        what = "a convolution kernel" if len(shape) == 4 else "ComfyUI's einsum needs (rank, rank, 1, 1)"
        raise LoraError(f"{source}: key {key!r}: a Tucker core of shape {shape} cannot patch a Linear "
                        f"layer ({what})")
    return shape[0], shape[1]


def _missing(g: Group, have: str, want: str, source: str) -> LoraError:
    return LoraError(f"{source}: key {g.parts[have]!r}: its partner {g.prefix}.{want} is missing")


def _pair(g: Group, a: str, b: str, t: str | None, shapes: Shapes, source: str) -> tuple[int, int, int]:
    """(out, in, inner rank) of a factor pair a @ b, or of a Tucker triple (a.T @ t @ b) when t is given."""
    p = g.parts
    if a not in p and b not in p:
        raise LoraError(f"{source}: key {next(iter(p.values()))!r}: {g.prefix} has neither {a} nor {b}")
    if a not in p or b not in p:
        raise _missing(g, a if a in p else b, b if a in p else a, source)
    (a0, a1), (b0, b1) = _mat(shapes, p[a], source), _mat(shapes, p[b], source)
    if t is not None:
        i, j = _tucker(shapes, p[t], source)
        if (a0, b0) != (i, j):
            raise LoraError(f"{source}: key {p[t]!r}: Tucker core {i}x{j} does not fit {a} ({a0}x{a1}) "
                            f"and {b} ({b0}x{b1})")
        return a1, b1, b0
    if a1 != b0:
        raise LoraError(f"{source}: key {p[a]!r}: rank mismatch, {a} is {a0}x{a1} but {b} is {b0}x{b1}")
    return a0, b1, b0


def _lokr_factor(g: Group, n: int, shapes: Shapes, source: str) -> tuple[int, int, int | None]:
    """(rows, cols, rank or None when full) of LoKr's w1 or w2."""
    p, full, a, b = g.parts, f"lokr_w{n}", f"lokr_w{n}_a", f"lokr_w{n}_b"
    if full in p:
        extra = next((x for x in (a, b) if x in p), None)
        if extra is not None:
            raise LoraError(f"{source}: key {p[extra]!r}: {g.prefix} has both {full} and {extra}; "
                            f"ComfyUI would silently ignore {extra}")
        return (*_mat(shapes, p[full], source), None)
    if a not in p and b not in p:
        raise LoraError(f"{source}: key {next(iter(p.values()))!r}: LoKr module {g.prefix} has neither "
                        f"{full} nor {a}/{b}")
    return _pair(g, a, b, None, shapes, source)


def check_group(g: Group, shapes: Shapes, spec: ZitSpec, source: str) -> tuple[tuple[int, int], int | None]:
    """The dW shape of a group (checked against the model) and the rank that alpha divides (None: scale 1).

    The rank follows ComfyUI: LoKr takes w1_b's rows, then w2_b's when w2 is decomposed too (none when
    neither is: alpha is ignored); LoHa takes hada_w1_b's rows; LoRA the down factor's; a diff has none.
    """
    p = g.parts
    if g.kind == "lokr":
        a, c, r1 = _lokr_factor(g, 1, shapes, source)
        b, d, r2 = _lokr_factor(g, 2, shapes, source)
        shape, dim = (a * b, c * d), r2 if r2 is not None else r1
    elif g.kind == "loha":
        tucker = "hada_t1" in p or "hada_t2" in p
        for t in ("hada_t1", "hada_t2") if tucker else ():
            if t not in p:
                other = "hada_t2" if t == "hada_t1" else "hada_t1"
                raise _missing(g, other, t, source)
        o1, i1, dim = _pair(g, "hada_w1_a", "hada_w1_b", "hada_t1" if tucker else None, shapes, source)
        o2, i2, _ = _pair(g, "hada_w2_a", "hada_w2_b", "hada_t2" if tucker else None, shapes, source)
        if (o1, i1) != (o2, i2):
            raise LoraError(f"{source}: key {p['hada_w2_a']!r}: the two Hadamard factors give {o1}x{i1} "
                            f"and {o2}x{i2}")
        shape = (o1, i1)
    elif g.kind == "full":
        shape, dim = _mat(shapes, p["diff"], source, "diff"), None
    else:
        o, i, dim = _pair(g, "lora_up", "lora_down", None, shapes, source)
        shape = (o, i)
    want = (3 * spec.dim, spec.dim) if g.target[1] == QKV else spec.shape(g.target)
    if shape != want:
        raise LoraError(f"{source}: key {next(iter(p.values()))!r}: dW would be {shape[0]}x{shape[1]} but "
                        f"the model's weight is {want[0]}x{want[1]}")
    return shape, dim
