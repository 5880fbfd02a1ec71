"""The ZIT LoRA file nodes in a real ComfyUI (in-process, CPU): Merge Save writes the exact sum (or its SVD
at a rank) into the loras folder and refuses bad prefixes and blocks, Inspect outputs the heatmap image and
the stats table, Convert round-trips every dialect.

Runs against a ComfyUI checkout (COMFYUI_PATH, or this repo inside ComfyUI/custom_nodes/); skipped otherwise.
The LoRAs are _patching_helpers'.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _comfy_inproc as host  # noqa: E402

ROOT, PACK = host.setup_or_skip()  # ComfyUI on the CPU, the pack as zit_trainer_pack; imports below

import folder_paths  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _patching_helpers import KEYS, lora_for  # noqa: E402
from _patching_helpers import _like_comfyui as _like_comfyui  # a fixture (autouse here)  # noqa: E402
from _patching_helpers import loras as loras  # a fixture (module-scoped here)  # noqa: E402
from zit_trainer_pack.nodes import lora_nodes  # noqa: E402
from zit_trainer_pack.trainer.errors import ZitError  # noqa: E402
from zit_trainer_pack.trainer.lora import formats  # noqa: E402
from zit_trainer_pack.trainer.lora.canonical import Lora  # noqa: E402
from zit_trainer_pack.trainer.lora.inspect import heatmap_png, stats_table  # noqa: E402

DIALECTS = formats.DIALECTS


def deltas(lora: Lora) -> dict:
    return {k: m.delta() for k, m in lora.modules.items()}


def test_merge_save_writes_the_exact_sum(loras):
    a, b = lora_for(12, rank=4), lora_for(13, rank=2, keys=KEYS[::2])
    loras("merge_a.safetensors", a)
    loras("merge_b.safetensors", b, "kohya")
    node = lora_nodes.ZITLoraMergeSave
    saved = node.execute(mode="exact", rank=8, dialect="comfy", dtype="keep", filename_prefix="zit/merged",
                         lora_1="merge_a.safetensors", ratio_1=1.0, blocks_1="all",
                         lora_2="merge_b.safetensors", ratio_2=-0.5, blocks_2="L00=0",
                         lora_3="none", ratio_3=1.0, blocks_3="all")
    assert saved[0] == "zit/merged.safetensors"
    assert saved[0] in folder_paths.get_filename_list("loras")
    merged = formats.read_lora(loras.folder / saved[0])
    da, db = deltas(a), deltas(b)
    assert set(merged.modules) == set(KEYS)
    for key, d in deltas(merged).items():
        want = da[key] + (-0.5 * db[key] if key in db and key[0] != "L00" else 0)
        torch.testing.assert_close(d, want, atol=1e-6, rtol=1e-5, msg=str(key))

    first = (loras.folder / saved[0]).read_bytes()
    again = node.execute(mode="svd", rank=2, dialect="aitoolkit", dtype="bf16", filename_prefix="zit/merged",
                         lora_1="merge_b.safetensors", ratio_1=1.0, blocks_1="all")
    assert again[0] == "zit/merged_001.safetensors"
    assert (loras.folder / saved[0]).read_bytes() == first
    resized = formats.read_lora(loras.folder / again[0])
    assert resized.ranks() == {2}
    for key, d in deltas(resized).items():
        torch.testing.assert_close(d, db[key], atol=2e-3, rtol=2e-2, msg=str(key))
    assert not [p for p in loras.folder.rglob("*") if ".tmp" in p.name]


def test_merge_refuses_bad_input(loras):
    loras("merge_c.safetensors", lora_for(14))
    node = lora_nodes.ZITLoraMergeSave
    for prefix in ("../outside", "/abs/path", "C:/x", "a//b", ""):
        with pytest.raises(ZitError, match="filename_prefix"):
            node.execute(mode="exact", rank=4, dialect="aitoolkit", dtype="keep", filename_prefix=prefix,
                         lora_1="merge_c.safetensors", ratio_1=1.0, blocks_1="all")
    assert sorted(p.name for p in loras.folder.parent.iterdir() if p.name == "outside") == []
    with pytest.raises(ZitError, match="L99"):
        node.execute(mode="exact", rank=4, dialect="aitoolkit", dtype="keep", filename_prefix="x",
                     lora_1="merge_c.safetensors", ratio_1=1.0, blocks_1="L99=0")


def test_inspect_outputs_image_and_table(loras):
    lora = lora_for(15)
    name = loras("inspect.safetensors", lora, "diffsynth")
    image, table = lora_nodes.ZITLoraInspect.execute(name, "erank")
    assert image.dtype == torch.float32 and image.ndim == 4 and image.shape[0] == 1 and image.shape[3] == 3
    assert 0 <= float(image.min()) and float(image.max()) <= 1
    read = formats.read_lora(loras.folder / name)
    png = torch.from_numpy(np.asarray(heatmap_png(read, None, "erank"), dtype=np.float32)) / 255
    assert torch.equal(image[0], png)
    assert table == stats_table(read)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_convert_round_trips(loras, dialect):
    lora = lora_for(16)
    name = loras(f"convert_src_{dialect}.safetensors", lora, "kohya")
    saved = lora_nodes.ZITLoraConvert.execute(name, dialect, "keep", "")[0]
    assert saved == f"convert_src_{dialect}_{dialect}.safetensors"
    back = formats.read_lora(loras.folder / saved)
    assert back.metadata["zit.format"] == dialect
    want = deltas(lora)
    assert set(back.modules) == set(want)
    for key, d in deltas(back).items():
        torch.testing.assert_close(d, want[key], atol=1e-7, rtol=1e-6, msg=str(key))


