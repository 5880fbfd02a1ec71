"""Block swap: training with only K+P of N main blocks materialised gives the LoRA bit for bit, each block is
materialised whenever it runs (forward and backward recompute), the traffic is 2*(N-K-P) block loads a step,
LoRA weights never move, and remove() gives the model back as it was."""

from __future__ import annotations

import pytest
import torch

from trainer.errors import ZitError
from trainer.lora.spec import ZIT, ZitSpec
from trainer.lora.synth import random_lora
from trainer.model import (
    attach_frozen_adapter,
    build_transformer,
    inject_lora,
    lora_from_peft,
    predict_velocity,
)
from trainer.model.quantize import FP8, quantize_transformer_fp8
from trainer.model.swap import _ALIGN, BlockSwap, BlockSwapError, _slab_layout, loads_per_step
from trainer.tiny import _seeded

SPEC = ZitSpec(dim=64, n_layers=6, n_refiner_layers=1, n_heads=4, cap_feat_dim=32, in_channels=16)
N = SPEC.n_layers


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(fp8: bool = False, adapter: bool = False, device: str = "cpu") -> torch.nn.Module:
    """The 6-block model with seeded weights, a gaussian-init trainable LoRA (+ a frozen adapter), ckpt on."""
    model = _seeded(lambda: build_transformer(SPEC, "cpu"), 0)
    if fp8:
        quantize_transformer_fp8(model, torch.float32)
    torch.manual_seed(1)
    inject_lora(model, 4, 4.0, "aitoolkit", init="gaussian")
    if adapter:
        attach_frozen_adapter(model, random_lora(2, SPEC, seed=3, std=0.05), 0.8)
    model.enable_gradient_checkpointing()
    return model.to(device).train()


def batch(step: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, list, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    sigmas = torch.rand(2, generator=g)
    embeds = [torch.randn(5, 32, generator=g).to(device), torch.randn(3, 32, generator=g).to(device)]
    noisy = (1 - sigmas.view(-1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1) * noise
    return noisy.to(device), sigmas.to(device), embeds, (noise - x0).to(device)


def train(model: torch.nn.Module, steps: int, swap: BlockSwap | None = None) -> tuple[list[float], list[int]]:
    """AdamW steps on the trainable LoRA; returns the losses and the block loads of each step."""
    device = str(next(p for p in model.parameters() if p.requires_grad).device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses, loads = [], []
    for step in range(steps):
        before = swap.loads if swap else 0
        noisy, sigmas, embeds, target = batch(step, device)
        loss = (predict_velocity(model, noisy, sigmas, embeds) - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        loads.append((swap.loads if swap else 0) - before)
    return losses, loads


def frozen(layer: torch.nn.Module) -> list[torch.Tensor]:
    """The test's own notion of a block's frozen base tensors: non-LoRA params and the buffers."""
    return [p for n, p in layer.named_parameters() if "lora_" not in n] + list(layer.buffers())


def materialised(model: torch.nn.Module, blocks: list[list[torch.Tensor]] | None = None) -> set[int]:
    """Blocks whose frozen tensors (the swap keeps the tensor objects) all hold data; never half there."""
    out = set()
    for i, tensors in enumerate(blocks or [frozen(layer) for layer in model.layers]):
        full = [t.numel() > 0 for t in tensors]
        assert all(full) or not any(full), f"block {i} is partly materialised"
        if all(full):
            out.add(i)
    return out


def next_blocks(rest: list[int], running: int, count: int) -> list[int]:
    """The first `count` distinct blocks other than `running` in `rest`."""
    out: list[int] = []
    for j in rest:
        if j != running and j not in out:
            out.append(j)
    return out[:count]


def assert_same_lora(a, b) -> None:
    assert a.modules.keys() == b.modules.keys()
    for k in a.modules:
        assert torch.equal(a.modules[k].a, b.modules[k].a), k
        assert torch.equal(a.modules[k].b, b.modules[k].b), k


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_training_with_swap_equals_training_without_bit_for_bit(fp8):
    K, P, steps = 2, 1, 3
    reference = make_model(fp8)
    if fp8:
        assert reference.layers[0].attention.to_q.base_layer.weight.dtype == FP8
    start = lora_from_peft(reference)
    ref_losses, _ = train(reference, steps)
    model = make_model(fp8)
    swap = BlockSwap(model, "cpu", K, P)
    losses, loads = train(model, steps, swap)
    trained = lora_from_peft(model)
    assert any(not torch.equal(start.modules[k].b, trained.modules[k].b) for k in start.modules)
    assert losses == ref_losses
    assert_same_lora(lora_from_peft(reference), trained)
    assert loads == [2 * (N - K - P)] * steps == [loads_per_step(N, K, P)] * steps
    assert swap.loads == K + P + sum(loads)
    assert swap.bytes_copied == swap.loads * swap.block_bytes[0] > 0
    with torch.no_grad():
        noisy, sigmas, embeds, _ = batch(7)
        assert torch.equal(predict_velocity(model, noisy, sigmas, embeds),
                           predict_velocity(reference, noisy, sigmas, embeds))


@pytest.mark.parametrize(("K", "P"), [(2, 1), (1, 0), (1, 2), (3, 2)])
def test_blocks_are_materialised_when_they_run_and_never_more_than_k_plus_p(K, P):
    model = make_model(adapter=True)
    lora = {n: (p, p.data_ptr(), p.shape) for n, p in model.named_parameters() if "lora_" in n}
    assert {p.requires_grad for p, _, _ in lora.values()} == {True, False}  # trained LoRA + frozen adapter
    swap = BlockSwap(model, "cpu", K, P)
    seen: list[tuple[int, str, set[int]]] = []  # (block, where, materialised then)
    blocks = [frozen(layer) for layer in model.layers]

    def note(i: int, where: str) -> None:
        now = materialised(model, blocks)
        assert swap.resident() == now
        seen.append((i, where, now))

    def before(i: int, name: str):
        return lambda module, args: note(i, name or "block")

    def after(i: int):
        def hook(module, args, out):
            if out.requires_grad:  # fires in backward, when the gradient reaches this block's output
                out.register_hook(lambda grad: note(i, "grad"))
        return hook

    for i, layer in enumerate(model.layers):  # registered after the swap's hook: they run after it
        for name, module in layer.named_modules():
            module.register_forward_pre_hook(before(i, name))
        layer.register_forward_hook(after(i))

    for _ in range(2):
        seen.clear()
        _, [loads] = train(model, 1, swap)
        assert loads == 2 * max(0, N - K - P)
        calls = [(i, now) for i, where, now in seen if where == "block"]
        order = [i for i, _ in calls]
        assert order == list(range(N)) + list(range(N - 1, -1, -1))  # forward, then the recompute
        for k, (i, now) in enumerate(calls):  # the next P blocks to run are already there (being copied)
            assert set(next_blocks(order[k + 1:], i, P)) <= now, (k, i, now)
        assert all(i in now for i, where, now in seen if where != "grad")  # each module runs on its weights
        assert max(len(now) for _, _, now in seen) == K + P
        assert {i for i, where, _ in seen if where == "grad"} == set(range(N))
    with torch.no_grad():
        for _ in range(3):
            seen.clear()
            before = swap.loads
            predict_velocity(model, *batch(5)[:3])
            calls = [(i, now) for i, where, now in seen if where == "block"]
            assert [i for i, _ in calls] == list(range(N))
            assert all(set(range(i + 1, min(N, i + 1 + P))) <= now for i, now in calls)
            assert all(i in now and len(now) <= K + P for i, _, now in seen)
            assert 0 < swap.loads - before <= N - K + 1
    assert swap.max_resident == K + P
    for name, (p, ptr, shape) in lora.items():
        assert p.device.type == "cpu" and p.shape == shape and p.data_ptr() == ptr, name


def test_remove_gives_every_frozen_tensor_back():
    model = make_model(fp8=True, adapter=True)
    before = {n: t.clone() for n, t in model.layers.state_dict().items() if "lora_" not in n}
    assert any(n.endswith("weight_scale") for n in before)
    swap = BlockSwap(model, "cpu", 2, 1)
    assert len(materialised(model)) == 3
    with pytest.raises(BlockSwapError, match="already installed"):
        BlockSwap(model, "cpu", 2, 1)
    train(model, 1, swap)
    swap.remove()
    after = {n: t for n, t in model.layers.state_dict().items() if "lora_" not in n}
    assert after.keys() == before.keys()
    for n, t in before.items():
        assert after[n].dtype == t.dtype and torch.equal(after[n], t), n
    loads = swap.loads
    with torch.no_grad():
        predict_velocity(model, *batch(5)[:3])
    assert swap.loads == loads  # the hooks are gone
    swap.remove()  # twice is harmless
    with BlockSwap(model, "cpu", 1, 1) as again:
        assert materialised(model) == {0, 1}
    assert again.resident() == set() and materialised(model) == set(range(N))


@pytest.mark.parametrize(("resident", "prefetch", "message"), [
    (40, 1, "model.swap_blocks = 40: must be between 1 and 5 for this model"),
    (0, 1, "model.swap_blocks = 0: must be between 1 and 5 for this model"),
    (N, 1, "model.swap_blocks = 6: must be between 1 and 5 for this model"),
    (2, -1, "model.swap_prefetch = -1: must be between 0 and 5 for this model"),
])
def test_bad_block_counts_are_refused(resident, prefetch, message):
    model = make_model()
    with pytest.raises(ZitError) as err:
        BlockSwap(model, "cpu", resident, prefetch)
    assert str(err.value) == message
    assert materialised(model) == set(range(N)) and not hasattr(model, "_zit_block_swap")


def test_lora_on_another_device_and_training_without_checkpointing_are_refused():
    model = make_model()
    with pytest.raises(BlockSwapError, match=r"layers\.0\.attention\.to_q\.lora_A\.zit\.weight is on cpu"):
        BlockSwap(model, "meta", 2, 1)  # the LoRA was not moved to the swap's device
    assert materialised(model) == set(range(N))
    model.disable_gradient_checkpointing()
    swap = BlockSwap(model, "cpu", 2, 1)
    with pytest.raises(BlockSwapError, match="model.gradient_checkpointing = true"):
        train(model, 1, swap)
    with torch.no_grad():  # sampling needs no checkpointing
        predict_velocity(model, *batch(5)[:3])


def test_masters_pack_into_slabs_without_the_pinned_allocators_power_of_two_waste():
    gen = torch.Generator().manual_seed(0)
    sizes = [int(s) for s in torch.randint(0, 3000, (200,), generator=gen)] + [5000, 0, 1]
    places, used = _slab_layout(sizes, slab=4096)
    spans: dict[int, list[tuple[int, int]]] = {}
    for size, (k, offset) in zip(sizes, places, strict=True):
        assert offset % _ALIGN == 0 and offset + size <= used[k]
        spans.setdefault(k, []).append((offset, offset + size))
    for k, items in spans.items():
        items.sort()
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(items, items[1:], strict=False)), k
        assert used[k] <= max(4096, max(end - start for start, end in items) + _ALIGN)
    assert sum(u <= 2048 for u in used) <= 1  # first fit: two half-empty slabs would have been one
    # ZIT in bf16: pinning each tensor rounds it up to a power of two; slabs pin ~what is needed.
    layers = build_transformer(ZIT, "meta").layers
    sizes = [t.numel() * 2 for layer in layers for t in frozen(layer)]
    pinned = sum(1 << (u - 1).bit_length() for u in _slab_layout(sizes)[1])
    assert sum(1 << (s - 1).bit_length() for s in sizes) / sum(sizes) > 1.5
    assert pinned / sum(sizes) < 1.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned masters, side stream)")
def test_cuda_swap_matches_and_frees_the_blocks():
    K, P = 2, 1
    reference = make_model(device="cuda")
    ref_losses, _ = train(reference, 2)
    model = make_model(device="cuda")
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    swap = BlockSwap(model, "cuda", K, P)
    torch.cuda.synchronize()
    freed = allocated - torch.cuda.memory_allocated()
    assert freed >= 0.95 * (N - K - P) * swap.block_bytes[0]
    assert all(m.is_pinned() for b in swap._blocks for m in b.masters)
    losses, loads = train(model, 2, swap)
    assert loads == [2 * (N - K - P)] * 2
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
    a, b = lora_from_peft(reference), lora_from_peft(model)
    for k in a.modules:
        torch.testing.assert_close(a.modules[k].b, b.modules[k].b, rtol=1e-4, atol=1e-6)
    assert all(t.device.type == "cuda" for layer in model.layers for t in frozen(layer))
    swap.remove()
    assert materialised(model) == set(range(N))
