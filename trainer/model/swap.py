"""Block swap for low-VRAM training: only some main blocks keep their frozen weights on the GPU.

What is swapped: in every main block `model.layers[i]`, each parameter that does not require grad and whose
name has no `lora_` (the frozen base: bf16 weights, or Fp8Linear's fp8 `weight`), and each floating buffer
(Fp8Linear's `weight_scale`). A CPU master copy of them (in 256 MiB slabs, pinned when the device is CUDA)
is the source of every load; a block that is not resident holds zero-element placeholders on the device
(same dtype), so "not resident" is real on CPU too. Blocks are frozen: nothing is ever copied back. LoRA
parameters (trained or frozen adapters), their grads and optimizer state, the embedders, the refiners and
the final layer stay where they are (on the device).

When: a forward pre-hook on each block makes it resident before it runs (waiting on its copy), then starts
copying the next `prefetch` blocks in (on a side CUDA stream; synchronous copies on CPU). Training runs with
gradient checkpointing (required: without it autograd saves block weights for backward, and eviction would
empty them), so the hooks fire in the forward 0..N-1 and again in the backward recompute N-1..0. Without
grad, blocks run forward only.

Policy: the device holds at most K + P blocks (K = `resident`, P = `prefetch`). The run order is predicted:
a forward with grad and checkpointing goes 0..N-1 then N-1..0 (the recompute), then the next forward; a
forward without grad goes 0..N-1, then the next forward. At each block: load it if it is not resident, then
start loading the next P blocks of that order; to make room, evict the block whose next use in that order
is farthest, never the running block nor those next P. Mid-sweep the device holds the running block, the
K-1 blocks used just before it and the P being copied in; at a turn (end of forward -> recompute, end of
backward -> next forward) no copy is needed and the K+P blocks just used are the next ones used. On the
training cycle "farthest next use" is the least recently used block.

Traffic: a training step (forward + backward) loads 2*(N-K-P) blocks (none when K+P >= N), the first step
included (install loads blocks 0..K+P-1); a no-grad forward (previews, the differential-guidance base)
loads at most N-K+1. A ZIT main block holds 181M weights: 0.36 GB in bf16, 0.185 GB in fp8. On CUDA
the caching allocator reuses an evicted block's memory only once the compute stream is past its last use:
budget about one block more than K+P.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ZitError


class BlockSwapError(ZitError):
    """Block swap cannot be set up as asked (block counts out of range, tensors on the wrong device)."""


def loads_per_step(n_blocks: int, resident: int, prefetch: int) -> int:
    """Blocks BlockSwap copies to the device per training step (forward + checkpointed backward)."""
    return 2 * max(0, n_blocks - resident - prefetch)


@dataclass
class _Block:
    tensors: list[torch.Tensor] = field(default_factory=list)  # the module's params/buffers (swapped .data)
    masters: list[torch.Tensor] = field(default_factory=list)  # CPU copies (slab views): every load's source
    homes: list[torch.device] = field(default_factory=list)  # where each tensor was at install
    nbytes: int = 0


_SLAB = 1 << 28  # bytes per master slab (256 MiB)
_ALIGN = 512  # byte alignment of each master inside its slab


def _slab_layout(sizes: list[int], slab: int = _SLAB) -> tuple[list[tuple[int, int]], list[int]]:
    """First-fit-decreasing packing of byte sizes into slabs of `slab` bytes (a bigger item gets a slab of
    its own): (slab index, byte offset) of each item, and the bytes used in each slab."""
    places: list[tuple[int, int]] = [(0, 0)] * len(sizes)
    used: list[int] = []
    caps: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        need = -(-sizes[i] // _ALIGN) * _ALIGN
        k = next((k for k in range(len(used)) if used[k] + need <= caps[k]), len(used))
        if k == len(used):
            used.append(0)
            caps.append(max(slab, need))
        places[i] = (k, used[k])
        used[k] += need
    return places, used


def _slab_views(tensors: list[torch.Tensor], pin: bool) -> list[torch.Tensor]:
    """Uninitialised CPU tensors shaped like `tensors`, as views into a few shared slabs (pinned when `pin`).

    torch's pinned allocator rounds every allocation up to a power of two: pinning ZIT's 78.6 MB FFN weights
    one by one would pin 128 MB each (51% more host memory over the whole model); 256 MiB slabs waste ~1%.
    """
    places, used = _slab_layout([t.numel() * t.element_size() for t in tensors])
    slabs = [torch.empty(size, dtype=torch.uint8, pin_memory=pin) for size in used]
    return [slabs[k][offset:offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            for t, (k, offset) in zip(tensors, places, strict=True)]


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _is_swapped(name: str, t: torch.Tensor, is_buffer: bool) -> bool:
    if is_buffer:
        return t.is_floating_point()
    return not t.requires_grad and "lora_" not in name


class BlockSwap:
    """Keep `resident` + `prefetch` of the model's main blocks on `device`, stream the others in from CPU.

    Probes: `resident()` (blocks materialised now), `max_resident` (most ever at once), `loads` and
    `bytes_copied` (since install, its own first loads included), `block_bytes`. `remove()` (or leaving a
    `with` block) puts every block back where it was.
    """

    def __init__(self, model: nn.Module, device: torch.device | str, resident: int,
                 prefetch: int = 1) -> None:
        layers = getattr(model, "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) < 2:
            raise BlockSwapError("block swap needs a Z-Image transformer with at least 2 main blocks")
        n = len(layers)
        if not isinstance(resident, int) or not 1 <= resident <= n - 1:
            raise BlockSwapError(f"model.swap_blocks = {resident}: must be between 1 and {n - 1} "
                                 "for this model")
        if not isinstance(prefetch, int) or not 0 <= prefetch <= n - 1:
            raise BlockSwapError(f"model.swap_prefetch = {prefetch}: must be between 0 and {n - 1} "
                                 "for this model")
        if getattr(model, "_zit_block_swap", None) is not None:
            raise BlockSwapError("block swap is already installed on this model")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.model, self.device, self.n = model, device, n
        self.resident_blocks, self.prefetch = resident, prefetch
        self.capacity = min(n, resident + prefetch)
        self.cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._blocks = [self._collect(i, layer) for i, layer in enumerate(layers)]
        self.block_bytes = [b.nbytes for b in self._blocks]
        self.loads = self.bytes_copied = self.max_resident = 0
        self._here: dict[int, torch.cuda.Event | None] = {}  # materialised blocks -> their pending copy
        self._prev, self._dir, self._bounce = -1, 1, False
        masters = iter(_slab_views([t for b in self._blocks for t in b.tensors], self.cuda))
        for i, b in enumerate(self._blocks):  # each original is freed as soon as it is copied: no 2x peak
            b.masters = [next(masters).copy_(t.detach()) for t in b.tensors]
            self._drop(i)
        for i in range(self.capacity):  # what a training step leaves: the blocks the next forward starts with
            self._start_load(i)
        self._hooks = [model.register_forward_pre_hook(self._before_model)]
        self._hooks += [b.register_forward_pre_hook(self._block_hook(i)) for i, b in enumerate(layers)]
        model._zit_block_swap = self

    # ---- set-up -----------------------------------------------------------------------------------

    def _collect(self, i: int, layer: nn.Module) -> _Block:
        block = _Block()
        named = [(n, t, False) for n, t in layer.named_parameters()]
        named += [(n, t, True) for n, t in layer.named_buffers()]
        for name, t, is_buffer in named:
            if not _is_swapped(name, t, is_buffer):
                if not _same_device(t.device, self.device):
                    raise BlockSwapError(f"layers.{i}.{name} is on {t.device}: move LoRA and trainable "
                                         f"tensors to {self.device} before installing block swap")
                continue
            block.tensors.append(t)
            block.homes.append(t.device)
            block.nbytes += t.numel() * t.element_size()
        return block

    # ---- moving blocks ----------------------------------------------------------------------------

    def _drop(self, i: int) -> None:
        """Replace block i's frozen tensors by empty placeholders on the device (memory freed)."""
        for t in self._blocks[i].tensors:
            t.data = torch.empty(0, dtype=t.dtype, device=self.device)
        self._here.pop(i, None)

    def _start_load(self, i: int) -> None:
        """Copy block i's masters into fresh device tensors; on CUDA on the side stream, ended by an event."""
        block, event = self._blocks[i], None
        if self.cuda:
            with torch.cuda.stream(self._stream):
                fresh = [m.to(self.device, non_blocking=True) for m in block.masters]
            event = torch.cuda.Event()
            event.record(self._stream)
        else:
            fresh = [m.clone() for m in block.masters]
        for t, new in zip(block.tensors, fresh, strict=True):
            t.data = new
        self._here[i] = event
        self.loads += 1
        self.bytes_copied += block.nbytes
        self.max_resident = max(self.max_resident, len(self._here))

    def _activate(self, i: int) -> None:
        """Make the compute stream wait for block i's copy; tell the allocator the compute stream uses it."""
        event, self._here[i] = self._here[i], None
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            if event is not None:
                stream.wait_event(event)
            for t in self._blocks[i].tensors:
                t.record_stream(stream)

    # ---- the policy -------------------------------------------------------------------------------

    def _next_use(self, j: int) -> int:
        """Hook calls until block j runs again in the predicted order (the running block: a full cycle)."""
        n, i = self.n, self._prev
        if self._dir > 0 and not self._bounce:  # forward 0..N-1, then the next forward
            return (j - i) % n or n
        cycle = 2 * n  # forward 0..N-1 at positions 0..N-1, recompute N-1..0 at positions N..2N-1
        pos = i if self._dir > 0 else cycle - 1 - i
        return min((q - pos) % cycle or cycle for q in (j, cycle - 1 - j))

    def _make_room(self, keep: set[int]) -> bool:
        """Evict blocks used farthest ahead (never those in `keep`) until one more fits; False if none can."""
        while len(self._here) >= self.capacity:
            victims = self._here.keys() - keep
            if not victims:
                return False
            self._drop(max(victims, key=self._next_use))
        return True

    def _before_model(self, module: nn.Module, args: tuple) -> None:
        self._prev, self._dir = -1, 1
        self._bounce = torch.is_grad_enabled() and bool(getattr(self.model, "gradient_checkpointing", False))

    def _block_hook(self, i: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self._check_grad(module, args)
            self._dir, self._prev = (1 if i > self._prev else -1), i
            ahead = sorted((j for j in range(self.n) if j != i), key=self._next_use)[:self.prefetch]
            keep = {i, *ahead}
            if i not in self._here:
                self._make_room(keep)  # always succeeds: at most `prefetch` blocks are kept besides i
                self._start_load(i)
            self._activate(i)
            for j in ahead:
                if j not in self._here:
                    if not self._make_room(keep):
                        break
                    self._start_load(j)
        return hook

    def _check_grad(self, module: nn.Module, args: tuple) -> None:
        if not torch.is_grad_enabled() or getattr(self.model, "gradient_checkpointing", False):
            return
        if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args) or any(
            p.requires_grad for p in module.parameters()
        ):
            raise BlockSwapError("block swap needs gradient checkpointing to train "
                                 "(model.gradient_checkpointing = true); else run under torch.no_grad()")

    # ---- probes and removal -----------------------------------------------------------------------

    def resident(self) -> set[int]:
        """Indices of the blocks whose frozen tensors are materialised on the device now (or being copied)."""
        return set(self._here)

    def remove(self) -> None:
        """Remove the hooks and materialise every block where it was at install; the model is as before."""
        if getattr(self.model, "_zit_block_swap", None) is not self:
            return
        for h in self._hooks:
            h.remove()
        for i in list(self._here):
            self._activate(i)
        for i, block in enumerate(self._blocks):
            for t, master, home in zip(block.tensors, block.masters, block.homes, strict=True):
                if i in self._here and _same_device(home, self.device):
                    continue
                t.data = master.to(home, copy=True)  # its own storage, not a view into a slab
        self._here.clear()
        self._blocks = []
        self.model._zit_block_swap = None

    def __enter__(self) -> BlockSwap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
