"""bitsandbytes nf4 / int8 storage: without bitsandbytes the error says how to install it; with it (an
optional extra, else skipped) the loaded blocks are its Linear4bit / Linear8bitLt, match quantizing in place,
stay within the measured error and get peft's QLoRA layers, whose LoRA weights receive gradients.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from _quantize_helpers import F32, velocity
from safetensors.torch import save_file

from trainer import model as M
from trainer.lora.spec import ZitSpec
from trainer.model.adapters import _lora_layers as lora_layers
from trainer.model.quantize import QUANTIZED_MODULES, quantize_transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def _bitsandbytes():
    try:
        import bitsandbytes
    except Exception:  # not installed, or a broken install
        return None
    return bitsandbytes


BNB = _bitsandbytes()


def test_nf4_without_bitsandbytes_says_how_to_install_it(tmp_path, source, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails, installed or not
    path = tmp_path / "zit.safetensors"
    save_file(M.to_comfy_state_dict(source.state_dict()), str(path))
    with pytest.raises(M.ModelLoadError, match='memory = "nf4" needs bitsandbytes: pip install bitsandbytes'):
        quantize_transformer(copy.deepcopy(source), "nf4", F32)
    for storage in ("nf4", "int8"):
        with pytest.raises(M.ModelLoadError, match=f'memory = "{storage}" needs bitsandbytes: pip install'):
            M.load_transformer(path, storage=storage)


# bitsandbytes' CPU nf4 kernel needs in_features % 64 == 0 and out_features % 32 == 0 (Z-Image's 3840 and
# 10240 are multiples of both; the tiny model's FFN of 170 is not): dim 192 gives an FFN of 512. One block
# keeps nf4's slow CPU fallback to a few seconds.
BNB_SPEC = ZitSpec(dim=192, n_layers=1, n_refiner_layers=0, n_heads=6, cap_feat_dim=32, in_channels=16)


@pytest.mark.skipif(BNB is None, reason="bitsandbytes is not installed (an optional extra)")
@pytest.mark.parametrize("storage", ["nf4", "int8"])
def test_bitsandbytes_storage_gets_peft_qlora_layers(tmp_path, embeds, storage):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        source = M.build_transformer(BNB_SPEC, "cpu").requires_grad_(False).eval()
    path = tmp_path / "zit.safetensors"
    save_file(M.to_comfy_state_dict(source.state_dict()), str(path))
    # train mode, as the Trainer runs it: in eval mode without grad bitsandbytes repacks nf4 weights for its
    # CPU kernel, which has no backward
    model = M.load_transformer(path, dtype=F32, storage=storage).train()
    kind = BNB.nn.Linear4bit if storage == "nf4" else BNB.nn.Linear8bitLt
    block = [n for n, m in model.named_modules() if QUANTIZED_MODULES.fullmatch(n)]
    assert len(block) == 7 and all(isinstance(model.get_submodule(n), kind) for n in block)
    assert getattr(model, "is_loaded_in_4bit" if storage == "nf4" else "is_loaded_in_8bit") is True
    with torch.no_grad():
        expected = velocity(source, embeds)
        loaded = velocity(model, embeds)
        built = copy.deepcopy(source).train()
        assert quantize_transformer(built, storage, F32) == block
        assert torch.equal(velocity(built, embeds), loaded)  # the same quantization, loaded or applied
    error = ((loaded - expected).norm() / expected.norm()).item()
    assert (0.01 < error < 0.08) if storage == "nf4" else (0.0003 < error < 0.006)  # measured 0.033 / 0.0014

    torch.manual_seed(0)
    M.inject_lora(model, 4, 4.0, "diffsynth")
    layers = dict(lora_layers(model))
    assert len(layers) == 7 and all(type(m).__module__ == "peft.tuners.lora.bnb" for m in layers.values())
    for layer in layers.values():
        layer.lora_B["zit"].weight.data.normal_(0, 0.02)
    velocity(model, embeds).square().mean().backward()
    grads = [layer.lora_A["zit"].weight.grad for layer in layers.values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
