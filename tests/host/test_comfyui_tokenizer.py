"""The headless engine on a ComfyUI checkout's own Qwen tokenizer (what `--comfyui PATH` / COMFYUI_PATH give a
single-file text encoder): found in the checkout, and the tokens it feeds Qwen3 for a caption are exactly the
tokens ComfyUI's Z-Image text encoder (CLIPLoader type lumina2 on qwen_3_4b) feeds it.

Runs against a ComfyUI checkout (COMFYUI_PATH, or this repo inside ComfyUI/custom_nodes/); skipped otherwise.
The text encoder is a small Qwen3 with the real vocabulary size (151669 ids), saved as ComfyUI stores
qwen_3_4b.safetensors ("model." prefix).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _comfy_inproc as host  # noqa: E402

ROOT, PACK = host.setup_or_skip()  # ComfyUI on the CPU, the pack as zit_trainer_pack; imports below

import torch  # noqa: E402
from comfy.text_encoders.z_image import ZImageTokenizer  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import Qwen3Config, Qwen3Model  # noqa: E402
from zit_trainer_pack.trainer import run_models  # noqa: E402
from zit_trainer_pack.trainer.config import config_from_dict  # noqa: E402
from zit_trainer_pack.trainer.model import load_text_encoder  # noqa: E402
from zit_trainer_pack.trainer.model.text_encoder import ZIT_PROMPT, comfyui_tokenizer  # noqa: E402

CAPTIONS = ["a red fox in the snow, 35mm photo", "zqx, a café at night; 東京の夜景",
            "  two  spaces\nand a line"]


def test_the_checkout_tokenizer_gives_comfyuis_z_image_tokens(tmp_path: Path):
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=151669, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    te_file = tmp_path / "text_encoders" / "qwen_3_4b.safetensors"
    te_file.parent.mkdir()
    save_file({f"model.{k}": v.contiguous() for k, v in Qwen3Model(config).state_dict().items()}, te_file)
    cfg = config_from_dict({
        "model": {"transformer": str(tmp_path / "z.safetensors"), "text_encoder": str(te_file),
                  "vae": str(tmp_path / "ae.safetensors")},
        "data": {"dataset": str(tmp_path / "images")}, "preview": {"every": 0}}, source="test")

    path, tokenizer = run_models.text_encoder_source(cfg, ROOT)
    assert tokenizer == comfyui_tokenizer(ROOT) == ROOT / "comfy" / "text_encoders" / "qwen25_tokenizer"
    te = load_text_encoder(path, torch.float32, tokenizer=tokenizer)
    assert te.template == ZIT_PROMPT  # the checkout's chat template is Qwen2.5's (a default system turn)

    comfy = ZImageTokenizer()
    for caption, prompt in zip(CAPTIONS, te.chat_prompts(CAPTIONS), strict=True):
        ours = te.tokenizer(prompt).input_ids
        theirs = [token for token, _ in comfy.tokenize_with_weights(caption)["qwen3_4b"][0]]
        assert ours == theirs, caption
        assert ours[:3] == [151644, 872, 198] and ours[-3:] == [151644, 77091, 198]  # <|im_start|>user\n ...
    embeddings = te.encode(CAPTIONS)
    lengths = [len(te.tokenizer(p).input_ids) for p in te.chat_prompts(CAPTIONS)]
    assert [tuple(e.shape) for e in embeddings] == [(n, 32) for n in lengths]
