"""A single-file Qwen3 text encoder (ComfyUI's qwen_3_4b.safetensors layout) with the tokenizer a ComfyUI
checkout ships: where the tokenizer is found (beside the file, --comfyui / COMFYUI_PATH, the ComfyUI the pack
is installed in), refusals in one line, prompts templated as ZImagePipeline does although the checkout's
chat template is Qwen2.5's, and the CLI training from such a file.

The ComfyUI checkout here is a folder laid out like one (comfy/text_encoders/qwen25_tokenizer with
vocab.json, merges.txt and a Qwen2Tokenizer tokenizer_config.json whose chat template adds a default system
turn), holding the tiny tokenizer's vocabulary, so the tiny text encoder can run on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from trainer import run_models
from trainer.cli import main as cli_main
from trainer.config import config_from_dict, config_to_toml
from trainer.demo import make_dataset
from trainer.lora.formats import read_lora
from trainer.model import ModelLoadError, load_text_encoder
from trainer.model.text_encoder import COMFYUI_TOKENIZER, ZIT_PROMPT, comfyui_tokenizer, prompt_template
from trainer.tiny import SPECIAL_TOKENS, save_tiny_checkpoints, tiny_text_encoder, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

F32 = torch.float32
PROMPTS = ["a red fox in the snow, 35mm photo", "zqx, a café at night", ""]
# Qwen2.5's chat template, reduced: a default system turn first when the prompt brings none.
QWEN25_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def write_comfyui_checkout(root: Path) -> Path:
    """A folder laid out like a ComfyUI checkout's Qwen tokenizer, with the tiny tokenizer's vocabulary."""
    folder = root.joinpath(*COMFYUI_TOKENIZER)
    folder.mkdir(parents=True)
    vocab = tiny_tokenizer().get_vocab()
    plain = {k: v for k, v in vocab.items() if k not in SPECIAL_TOKENS}
    (folder / "vocab.json").write_text(json.dumps(plain))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                               "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": special, "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace",
        "add_prefix_space": False, "model_max_length": 131072, "split_special_tokens": False,
        "chat_template": QWEN25_TEMPLATE, "processor_class": "Qwen2_5_VLProcessor"}))
    return root


def write_single_file(path: Path) -> Path:
    """The tiny text encoder as ComfyUI stores Qwen3: one safetensors file, "model." prefix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = tiny_text_encoder(0).model.state_dict()
    save_file({f"model.{k}": v.contiguous() for k, v in state.items()}, path)
    return path


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return write_comfyui_checkout(tmp_path_factory.mktemp("ComfyUI"))


@pytest.fixture(scope="module")
def te_file(tmp_path_factory) -> Path:
    return write_single_file(tmp_path_factory.mktemp("models") / "text_encoders" / "qwen_3_4b.safetensors")


def te_config(te: Path):
    """A config naming `te` as its text encoder (the other files need not exist: nothing loads them)."""
    return config_from_dict({
        "model": {"transformer": str(te.parent / "z.safetensors"), "text_encoder": str(te),
                  "vae": str(te.parent / "ae.safetensors")},
        "data": {"dataset": str(te.parent / "images")}, "preview": {"every": 0}}, source="test")


# ---- the tokenizer of a ComfyUI checkout ---------------------------------------------------------------


def test_single_file_with_the_checkout_tokenizer_encodes_as_the_pipeline(checkout, te_file):
    folder = comfyui_tokenizer(checkout)
    assert folder == checkout / "comfy" / "text_encoders" / "qwen25_tokenizer"
    te = load_text_encoder(te_file, F32, tokenizer=folder)
    reference = tiny_text_encoder(0)
    # the checkout's own chat template adds a system turn; the loaded encoder keeps ZIT's turn
    own = te.tokenizer.apply_chat_template([{"role": "user", "content": "a fox"}], tokenize=False,
                                           add_generation_prompt=True)
    assert own.startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert te.template == ZIT_PROMPT
    assert te.chat_prompts(PROMPTS) == reference.chat_prompts(PROMPTS)
    ours, expected = te.encode(PROMPTS), reference.encode(PROMPTS)
    assert [e.shape for e in ours] == [e.shape for e in expected]
    assert all(torch.equal(a, b) for a, b in zip(ours, expected, strict=True))
    # with the checkout's template as it is, the embeddings would differ: the fix is what makes them equal
    te.template = None
    assert te.encode(PROMPTS[:1])[0].shape[0] > expected[0].shape[0]


def test_a_qwen3_chat_template_is_used_as_it_is():
    assert prompt_template(tiny_tokenizer()) is None
    plain = tiny_tokenizer()
    plain.chat_template = None  # no chat template at all: the fixed turn
    assert prompt_template(plain) == ZIT_PROMPT


@pytest.mark.parametrize("broken", ["missing", "empty vocab", "no merges"])
def test_a_checkout_without_the_tokenizer_is_refused_in_one_line(tmp_path, broken):
    root = tmp_path / "ComfyUI"
    if broken != "missing":
        folder = write_comfyui_checkout(root).joinpath(*COMFYUI_TOKENIZER)
        if broken == "empty vocab":  # as in a checkout whose large files were not fetched
            (folder / "vocab.json").write_text("")
        else:
            (folder / "merges.txt").unlink()
    with pytest.raises(ModelLoadError) as info:
        comfyui_tokenizer(root)
    message = str(info.value)
    assert "\n" not in message and str(root) in message
    assert "comfy/text_encoders/qwen25_tokenizer" in message and "vocab.json" in message


def test_a_portable_install_folder_holding_comfyui_is_accepted(tmp_path):
    write_comfyui_checkout(tmp_path / "ComfyUI_windows_portable" / "ComfyUI")
    found = comfyui_tokenizer(tmp_path / "ComfyUI_windows_portable")
    assert found == tmp_path / "ComfyUI_windows_portable" / "ComfyUI" / "comfy" / "text_encoders" / \
        "qwen25_tokenizer"


# ---- where run_models finds it -------------------------------------------------------------------------


def test_text_encoder_source_order(tmp_path, checkout, te_file):
    cfg = te_config(te_file)
    assert run_models.text_encoder_source(cfg, None) == (te_file, None)
    assert run_models.text_encoder_source(cfg, checkout) == (te_file, comfyui_tokenizer(checkout))
    with pytest.raises(ModelLoadError, match=f"{tmp_path / 'nowhere'}: not a ComfyUI checkout"):
        run_models.text_encoder_source(cfg, tmp_path / "nowhere")
    beside = write_single_file(tmp_path / "own" / "qwen_3_4b.safetensors")
    (beside.parent / "tokenizer").mkdir()
    found = run_models.text_encoder_source(te_config(beside), checkout)
    assert found == (beside, beside.parent / "tokenizer")
    folder = tmp_path / "diffusers"
    folder.mkdir()
    assert run_models.text_encoder_source(te_config(folder), checkout) == (folder, None)


def test_without_a_tokenizer_the_load_error_says_how_to_give_one(te_file):
    te_path, tokenizer = run_models.text_encoder_source(te_config(te_file), None)
    with pytest.raises(ModelLoadError, match="needs a tokenizer folder.*--comfyui PATH or COMFYUI_PATH"):
        load_text_encoder(te_path, F32, tokenizer=tokenizer)


def test_comfyui_checkout_from_the_environment_or_the_install(tmp_path):
    assert run_models.comfyui_checkout({"COMFYUI_PATH": str(tmp_path)}) == tmp_path
    here = Path(run_models.__file__).absolute().parents[1]
    expected = here.parent.parent if here.parent.name == "custom_nodes" else None
    assert run_models.comfyui_checkout({}) == expected  # this checkout: not installed in a ComfyUI


# ---- the command line ----------------------------------------------------------------------------------


def test_cli_trains_with_a_single_file_text_encoder_and_comfyui(tmp_path, checkout, monkeypatch, capsys):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)  # --comfyui sets it; undone after the test
    ckpt = save_tiny_checkpoints(tmp_path / "models")
    te = write_single_file(tmp_path / "models" / "text_encoders" / "qwen_3_4b.safetensors")
    cfg = config_from_dict({
        "model": {"transformer": str(ckpt.transformer_file), "text_encoder": str(te),
                  "vae": str(ckpt.vae_file), "dtype": "fp32", "gradient_checkpointing": False},
        "data": {"dataset": str(make_dataset(tmp_path / "images", n=2, size=64)), "resolutions": [64],
                 "min_side": 32, "cache_dir": str(tmp_path / "cache")},
        "lora": {"rank": 4, "alpha": 4.0, "save_dtype": "fp32"},
        "optim": {"lr": 1e-2, "steps": 2, "seed": 0},
        "save": {"output_dir": str(tmp_path / "out"), "name": "run", "every": 0},
        "preview": {"every": 0},
    }, source="test")
    path = tmp_path / "run.toml"
    path.write_text(config_to_toml(cfg))

    assert cli_main(["train", "--config", str(path), "--comfyui", str(tmp_path / "nowhere")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"{tmp_path / 'nowhere'}: not a ComfyUI checkout" in err[0], err
    assert not (tmp_path / "cache").exists()  # refused before anything was encoded
    monkeypatch.delenv("COMFYUI_PATH")  # set by that --comfyui
    if run_models.comfyui_checkout() is None:  # this repo is not installed in a ComfyUI
        assert cli_main(["train", "--config", str(path)]) == 2
        assert "needs a tokenizer folder" in capsys.readouterr().err

    assert cli_main(["train", "--config", str(path), "--comfyui", str(checkout)]) == 0
    final = cfg.run_dir / "run.safetensors"
    assert f"LoRA: {final} (step 2)" in capsys.readouterr().out
    assert read_lora(final).metadata["zit.step"] == "2"
    texts = sorted((tmp_path / "cache" / "text").glob("*.safetensors"))
    assert len(texts) == 3  # two captions and the empty one, encoded through the checkout's tokenizer
