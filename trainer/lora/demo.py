"""The LoRA tools demo: generate two full-size ZIT LoRAs in two dialects and run every tool on them."""

from __future__ import annotations

import shlex
from pathlib import Path

import torch


def run_demo(out: str | Path = "demo_output", overwrite: bool = False) -> None:
    """Write demo LoRAs under `out`, then inspect, convert, scale and merge them with the `lora` commands
    (`overwrite`: replace the files of an earlier demo in `out`)."""
    from .commands import lora_parser
    from .spec import ATTENTION, BASE, ZIT
    from .synth import random_lora
    from .writing import write_lora

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    style = random_lora(rank=8, seed=1, dtype=torch.bfloat16)
    face = random_lora(rank=4, seed=2, dtype=torch.bfloat16,
                       keys=[k for k in ZIT.module_keys() if k[0] != BASE and k[1] in ATTENTION])
    write_lora(style, out / "style_kohya.safetensors", dialect="kohya")
    write_lora(face, out / "face_comfy.safetensors", dialect="comfy")
    print(f"generated {out}/style_kohya.safetensors (kohya, rank 8, all 34 blocks) and "
          f"{out}/face_comfy.safetensors (ComfyUI fused qkv, rank 4, attention only)")
    again = ["--overwrite"] if overwrite else []
    steps = [
        ["inspect", f"{out}/face_comfy.safetensors", "--heatmap", f"{out}/face_heatmap.png", *again],
        ["convert", f"{out}/style_kohya.safetensors", "-o", f"{out}/style_diffusers.safetensors",
         "--to", "diffusers", *again],
        ["scale", f"{out}/style_kohya.safetensors", "-o", f"{out}/style_late.safetensors",
         "--ratio", "0.8", "--blocks", "late", "--components", "adaLN=0", *again],
        ["merge", f"{out}/style_kohya.safetensors", f"{out}/face_comfy.safetensors",
         "-o", f"{out}/merged_exact.safetensors", "--ratio", "0.7", "--ratio", "1.0", *again],
        ["merge", f"{out}/style_kohya.safetensors", f"{out}/face_comfy.safetensors",
         "-o", f"{out}/merged_svd8.safetensors", "--ratio", "0.7", "--ratio", "1.0", "--mode", "svd",
         "--rank", "8", *again],
    ]
    parser = lora_parser()
    for argv in steps:
        print(f"\n$ python -m trainer lora {shlex.join(argv)}")
        args = parser.parse_args(argv)
        args.func(args)
