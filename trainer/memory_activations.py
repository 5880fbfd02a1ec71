"""Activation memory of one training step, replayed op by op on the diffusers Z-Image forward.

No tensor is created: each op of `ZImageTransformer2DModel.forward` (patch/caption embedders, refiners,
`ZImageTransformerBlock`, `FeedForward`, `ZSingleStreamAttnProcessor`, RMSNorm, the final layer) and of a peft
LoRA Linear under autocast is replayed on sizes, and records what autograd saves for backward with the rules
torch uses: a product saves each factor only when the other one needs a gradient, a frozen Linear saves its
input never and its weight only when its input needs a gradient (a parameter costs nothing, and so does an fp8
weight: Fp8Linear saves the stored weight, not a dequantized copy), RMSNorm saves its float32 upcast, the
rsqrt and its input, scaled-dot-product attention saves q, k, v, the output and a float32 logsumexp, and a
LoRA under autocast saves its own bf16 cast of the input (peft upcasts the input to the fp32 factors, autocast
casts it back), its rank-sized hidden and the bf16 casts of its factors. Nothing is saved before the first
tensor that needs a gradient: refiners without a LoRA cost nothing. Storages are counted once.

With gradient checkpointing each block keeps only its inputs from forward to backward; while block i is
recomputed and back-propagated, its saved tensors, its workspace and the inputs of blocks 0..i are alive.
The backward workspace of one block (three gradients of the FFN hidden, a float32 and an activation-dtype
gradient of the width) is fitted to the live tensors of real CPU steps (tests check the whole peak to
within 10% above them); CUDA kernels may add workspaces of their own (the calibration factor). The RoPE
table the model caches on first use (complex64, axes_lens x axes_dims / 2) is counted with what is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .memory_terms import ModelShapes
from .model.transformer import ZIT_AXES_LENS


@dataclass(eq=False)
class _T:
    """A tensor: its bytes and whether it needs a gradient (identity = storage)."""

    nbytes: int
    grad: bool = False


_PARAM = _T(0)  # a parameter: already counted with the weights


class _Tape:
    """The unique tensors autograd holds."""

    def __init__(self) -> None:
        self.saved: dict[int, _T] = {}

    def save(self, t: _T) -> None:
        if t.nbytes:
            self.saved.setdefault(id(t), t)


@dataclass(frozen=True)
class ActivationSetup:
    """What the activations depend on (token counts already padded to the model's multiple of 32)."""

    batch: int
    img_tokens: int
    text_tokens: int
    act_bytes: int  # 2 for bf16/fp16 (autocast), 4 for fp32
    rank: int
    lora: frozenset[str]  # Linear names with the trained LoRA
    checkpointing: bool = True
    fp32_layer_norm: bool = True  # CUDA autocast runs the final LayerNorm in float32 (CPU autocast does not)

    @property
    def autocast(self) -> bool:
        return self.act_bytes != 4


@dataclass(frozen=True)
class ActivationPeak:
    """The activation side of the step's peak."""

    act: int  # activation bytes alive at the peak (workspace included)
    kept: int  # held from forward to backward (checkpointing: block inputs and what is outside blocks)
    block: int  # the largest saved activations of one block
    workspace: int  # backward temporaries of the largest block
    where: str  # "forward end" or the block being back-propagated


@dataclass
class _Block:
    name: str
    rows: int
    inputs: list[_T]
    tape: _Tape = field(default_factory=_Tape)


def _union(*tapes: dict[int, _T]) -> dict[int, _T]:
    out: dict[int, _T] = {}
    for t in tapes:
        out.update(t)
    return out


def _bytes(saved: dict[int, _T]) -> int:
    return sum(t.nbytes for t in saved.values())


class _Forward:
    """One replayed forward of the transformer."""

    def __init__(self, shapes: ModelShapes, setup: ActivationSetup) -> None:
        spec = shapes.spec
        self.shapes, self.s, self.a = shapes, setup, setup.act_bytes
        self.dim, self.heads, self.hidden = spec.dim, spec.n_heads, spec.ffn_hidden
        self.cache: dict[str, _T] = {}  # autocast's casts of the LoRA factors, alive until autocast exits
        self.pre, self.post, self.const = _Tape(), _Tape(), _Tape()
        self.blocks: list[_Block] = []

    def new(self, numel: int, grad: bool = False, elem: int | None = None) -> _T:
        return _T(numel * (elem or self.a), grad)

    # ---- ops ---------------------------------------------------------------------------------------

    def linear(self, tape: _Tape, name: str, x: _T, rows: int) -> _T:
        out_f, in_f = self.shapes.linears[name]
        lora, r = name in self.s.lora, self.s.rank
        if lora:
            tape.save(self.new(rows * in_f) if self.s.autocast else x)  # LoRA's own cast of x
            a_cast = self.cache.setdefault(name + ".A", self.new(r * in_f)) if self.s.autocast else _PARAM
            b_cast = self.cache.setdefault(name + ".B", self.new(r * out_f)) if self.s.autocast else _PARAM
            if x.grad:
                tape.save(a_cast)
            tape.save(self.new(rows * r))
            tape.save(b_cast)
        return self.new(rows * out_f, x.grad or lora)

    def rmsnorm(self, tape: _Tape, x: _T, rows: int, d: int) -> _T:
        if x.grad:
            tape.save(x if self.a == 4 else self.new(rows * d, elem=4))  # pow(2) of the fp32 upcast
            tape.save(self.new(rows, elem=4))  # rsqrt
            tape.save(x)
        return self.new(rows * d, x.grad)

    def layer_norm(self, tape: _Tape, x: _T, rows: int, d: int) -> _T:
        if x.grad:
            upcast = self.s.fp32_layer_norm and self.a != 4
            tape.save(self.new(rows * d, elem=4) if upcast else x)
            tape.save(self.new(rows, elem=4 if upcast else None))  # mean
            tape.save(self.new(rows, elem=4 if upcast else None))  # rstd
        return self.new(rows * d, x.grad)

    def mul(self, tape: _Tape, a: _T, b: _T, numel: int) -> _T:
        if b.grad:
            tape.save(a)
        if a.grad:
            tape.save(b)
        return self.new(numel, a.grad or b.grad)

    def tanh(self, tape: _Tape, x: _T, numel: int) -> _T:
        out = self.new(numel, x.grad)
        if x.grad:
            tape.save(out)
        return out

    def silu(self, tape: _Tape, x: _T, numel: int) -> _T:
        if x.grad:
            tape.save(x)
        return self.new(numel, x.grad)

    def rope(self, tape: _Tape, x: _T, rows: int, freqs: _T) -> _T:
        if x.grad:
            tape.save(freqs)
        return self.new(rows * self.dim, x.grad)

    def attention(self, tape: _Tape, q: _T, k: _T, v: _T, rows: int) -> _T:
        grad = q.grad or k.grad or v.grad
        out = self.new(rows * self.dim, grad)
        if grad:
            for t in (q, k, v, out, self.new(rows * self.heads, elem=4)):  # + logsumexp
                tape.save(t)
        return out

    # ---- the model ---------------------------------------------------------------------------------

    def block(self, name: str, x: _T, rows: int, adaln: _T | None, freqs: _T) -> _T:
        """ZImageTransformerBlock.forward (modulated when adaln is given)."""
        b = _Block(name, rows, [x, freqs] + ([adaln] if adaln is not None else []))
        tape, d, batch = b.tape, self.dim, self.s.batch
        if adaln is not None:
            mod = self.linear(tape, f"{name}.adaLN_modulation.0", adaln, batch)
            gate_msa, gate_mlp = self.tanh(tape, mod, batch * d), self.tanh(tape, mod, batch * d)
            scale_msa, scale_mlp = self.new(batch * d, mod.grad), self.new(batch * d, mod.grad)
            h = self.mul(tape, self.rmsnorm(tape, x, rows, d), scale_msa, rows * d)
        else:
            h = self.rmsnorm(tape, x, rows, d)
        att = f"{name}.attention"
        q, k, v = (self.linear(tape, f"{att}.to_{c}", h, rows) for c in "qkv")
        head = d // self.heads
        q, k = (self.rope(tape, self.rmsnorm(tape, t, rows * self.heads, head), rows, freqs) for t in (q, k))
        o = self.attention(tape, q, k, v, rows)
        o = self.linear(tape, f"{att}.to_out.0", o, rows)  # the heads flattened: a view of the output
        n = self.rmsnorm(tape, o, rows, d)
        n = self.mul(tape, gate_msa, n, rows * d) if adaln is not None else n
        x = self.new(rows * d, x.grad or n.grad)
        f = self.rmsnorm(tape, x, rows, d)
        f = self.mul(tape, f, scale_mlp, rows * d) if adaln is not None else f
        ff = f"{name}.feed_forward"
        x1, x3 = self.linear(tape, f"{ff}.w1", f, rows), self.linear(tape, f"{ff}.w3", f, rows)
        p = self.mul(tape, self.silu(tape, x1, rows * self.hidden), x3, rows * self.hidden)
        y = self.rmsnorm(tape, self.linear(tape, f"{ff}.w2", p, rows), rows, d)
        y = self.mul(tape, gate_mlp, y, rows * d) if adaln is not None else y
        self.blocks.append(b)
        return self.new(rows * d, x.grad or y.grad)

    def run(self) -> None:
        """ZImageTransformer2DModel.forward on one batch of equal-size samples."""
        spec, s, pre = self.shapes.spec, self.s, self.pre
        batch, d, half_head = s.batch, self.dim, spec.dim // spec.n_heads // 2
        img, txt = batch * s.img_tokens, batch * s.text_tokens
        head = spec.dim // spec.n_heads
        axes = (head // 4, head * 3 // 8, head * 3 // 8)
        rope_table = sum(n * dim // 2 for n, dim in zip(ZIT_AXES_LENS, axes, strict=True))
        self.const.save(self.new(rope_table, elem=8))
        t = self.linear(pre, "t_embedder.mlp.0", self.new(batch * 256), batch)
        adaln = self.linear(pre, "t_embedder.mlp.2", self.silu(pre, t, batch * 1024), batch)
        patches = self.new(img * self.shapes.linears["all_x_embedder.2-1"][1])
        x = self.linear(pre, "all_x_embedder.2-1", patches, img)
        x = self.new(img * d, x.grad)  # pad tokens (torch.where)
        freqs = self.new(img * half_head, elem=8)  # complex64 RoPE table
        for i in range(spec.n_refiner_layers):
            x = self.block(f"noise_refiner.{i}", x, img, adaln, freqs)
        cap = self.linear(pre, "cap_embedder.1", self.new(txt * spec.cap_feat_dim), txt)
        cap = self.new(txt * d, cap.grad)
        freqs = self.new(txt * half_head, elem=8)
        for i in range(spec.n_refiner_layers):
            cap = self.block(f"context_refiner.{i}", cap, txt, None, freqs)
        rows = img + txt
        u = self.new(rows * d, x.grad or cap.grad)  # the unified sequence
        freqs = self.new(rows * half_head, elem=8)
        for i in range(spec.n_layers):
            u = self.block(f"layers.{i}", u, rows, adaln, freqs)
        final = "all_final_layer.2-1"
        n = self.layer_norm(self.post, u, rows, d)
        scale = self.linear(self.post, f"{final}.adaLN_modulation.1", self.silu(self.post, adaln, batch * d),
                            batch)
        n = self.mul(self.post, n, self.new(batch * d, scale.grad), rows * d)
        self.linear(self.post, f"{final}.linear", n, rows)

    # ---- the peak ----------------------------------------------------------------------------------

    def workspace(self, b: _Block) -> int:
        """Backward temporaries of one block at its peak, in the FFN: three gradients of the hidden (of w2's
        input, of w1's and w3's outputs) and the float32 + activation-dtype gradients of RMSNorm's input."""
        return b.rows * (3 * self.hidden * self.a + (4 + self.a) * self.dim) if b.tape.saved else 0

    def peak(self) -> ActivationPeak:
        """The largest set of live activations: at the end of forward, or during one block's backward."""
        ckpt = self.s.checkpointing
        inputs = _Tape()
        for b in self.blocks:
            if b.tape.saved:
                for t in b.inputs:
                    inputs.save(t)
        kept_of = [(inputs if ckpt else b.tape).saved for b in self.blocks]
        casts = {id(t): t for t in self.cache.values()}  # freed when autocast exits
        fwd = _union(self.const.saved, self.pre.saved, *kept_of, self.post.saved, casts)
        best = (_bytes(fwd), fwd, 0, "forward end")
        alive = _union(self.const.saved, self.pre.saved)
        for b in self.blocks:  # in forward order: block i runs its backward with blocks 0..i kept
            if not b.tape.saved:
                continue
            alive.update({id(t): t for t in b.inputs if t.nbytes} if ckpt else b.tape.saved)
            now = _union(alive, b.tape.saved)
            work = self.workspace(b)
            if _bytes(now) + work > best[0]:
                best = (_bytes(now) + work, now, work, b.name)
        total, live, work, where = best
        kept = _bytes(_union(self.const.saved, self.pre.saved, *kept_of))
        block = max((_bytes(b.tape.saved) for b in self.blocks), default=0)
        return ActivationPeak(total, kept, block, work, where)


def activation_peak(shapes: ModelShapes, setup: ActivationSetup) -> ActivationPeak:
    """The activation side of the peak of one training step (forward + backward) for this setup."""
    fwd = _Forward(shapes, setup)
    fwd.run()
    return fwd.peak()


def saved_bytes(shapes: ModelShapes, setup: ActivationSetup) -> dict[str, int]:
    """What autograd holds after one forward, per block: the tensors it saves, or with checkpointing the
    inputs it keeps for its recompute (a storage shared by blocks, like the RoPE frequencies, counts in
    the first); "outer": what the ops outside the blocks save."""
    fwd = _Forward(shapes, setup)
    fwd.run()
    seen: dict[int, _T] = {}
    out = {}
    for b in fwd.blocks:
        held = b.tape.saved
        if setup.checkpointing:
            held = {id(t): t for t in b.inputs if t.nbytes} if held else {}
        fresh = {k: v for k, v in held.items() if k not in seen}
        out[b.name] = _bytes(fresh)
        seen.update(fresh)
    out["outer"] = _bytes(_union(fwd.pre.saved, fwd.post.saved))
    return out
