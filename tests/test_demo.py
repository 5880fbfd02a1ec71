"""The demo shows learning: the tiny VAE really reconstructs, preview sheets are labelled, and the whole
`python -m trainer demo` turns colour noise into a red circle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import demo
from trainer.cli import build_parser, main
from trainer.model import ModelLoadError
from trainer.sampling import grid
from trainer.sheets import font, sheet_layout, stack, text_width, wrap
from trainer.tiny import TINY_VAE_FILE, tiny_vae, trained_tiny_vae


def pixels(folder) -> torch.Tensor:
    """The dataset's PNGs as (B,3,H,W) in [-1, 1]."""
    arrays = [np.asarray(Image.open(p).convert("RGB"), np.float32) for p in sorted(folder.glob("*.png"))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def centre_red(image: Image.Image, steps: int) -> list[float]:
    """Per preview cell (located by the sheet's layout), the share of clearly red pixels in the middle disc
    (radius 1/5 of the side: inside every circle the demo draws)."""
    size = demo.DEMO_SIZE
    layout = sheet_layout(1, len(demo.PROMPTS), (size, size), title=f"step {steps}, training adapter off",
                          row_labels=["turbo 8 steps cfg 1"], col_labels=demo.PROMPTS)
    assert image.size == layout.size
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 5) ** 2
    shares = []
    for x, y in layout.cells[0]:
        a = np.asarray(image.convert("RGB").crop((x, y, x + size, y + size))).astype(int)
        red = (a[..., 0] > 150) & (a[..., 1] < 90) & (a[..., 2] < 90)
        shares.append(float(red[disc].mean()))
    return shares


# ---- the tiny VAE ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("centred", [True, False])
def test_the_tiny_vae_reconstructs_the_demo_images(tmp_path, centred):
    x = pixels(demo.make_dataset(tmp_path / "data", n=8, size=128, centred=centred))
    vae = tiny_vae(0)
    y = vae.decode(vae.encode(x))
    relative = ((y - x).norm() / x.norm()).item()
    assert relative < 0.13, relative  # measured 0.10 (edges of the circle)
    assert (y - x).abs().mean().item() < 0.025  # measured 0.015: 2 levels of 255
    # the circle stays red and the background keeps its colour (pixels, 0..255)
    red = torch.tensor(demo.CIRCLE_RED) / 127.5 - 1
    mask = ((x - red[:, None, None]).abs().amax(1) < 1e-3)
    assert mask.float().mean() > 0.05
    assert ((y - x).abs().amax(1)[mask].mean() * 127.5).item() < 8  # measured 4.6
    # a random VAE of the same structure does not: the bound above means something
    random_vae = tiny_vae(1)
    assert ((random_vae.decode(random_vae.encode(x)) - x).norm() / x.norm()).item() > 0.5


def test_the_tiny_vae_latents_suit_the_sampler(tmp_path):
    """ZIT latents of the demo images are roughly zero-mean, unit-std: what the noise the sampler starts
    from looks like."""
    z = tiny_vae(0).encode(pixels(demo.make_dataset(tmp_path / "data", n=8, size=128, centred=True)))
    assert z.shape == (8, 16, 16, 16)
    assert abs(z.mean().item()) < 0.2 and 0.7 < z.std().item() < 1.4  # measured 0.01 and 1.04


def test_the_shipped_vae_file_is_small_and_a_missing_one_is_named(tmp_path):
    assert TINY_VAE_FILE.stat().st_size < 2 * 2**20
    with pytest.raises(ModelLoadError, match=r"nowhere\.safetensors: the tiny VAE's weights are missing"):
        trained_tiny_vae(tmp_path / "nowhere.safetensors")


# ---- labelled sheets -------------------------------------------------------------------------------------


def solid(colour, size=(64, 48)) -> Image.Image:
    return Image.new("RGB", size, colour)


def text_pixels(image: Image.Image, box) -> int:
    """Bright (label text) pixels inside box."""
    return int((np.asarray(image.crop(box).convert("L")) > 120).sum())


def test_a_labelled_grid_has_its_bands_its_text_and_its_cells_in_place():
    rows = [[solid((200, 0, 0)), solid((0, 200, 0))], [solid((0, 0, 200)), solid((90, 90, 0))]]
    plain = grid(rows)
    assert plain.size == (2 * (64 + 2) + 2, 2 * (48 + 2) + 2)  # no labels: the plain padded grid
    kwargs = {"title": "step 120, training adapter off", "row_labels": ["turbo 8 steps cfg 1", "de-turbo"],
              "col_labels": ["zqx, a red circle on a blue background", "zqx"]}
    sheet = grid(rows, **kwargs)
    layout = sheet_layout(2, 2, (64, 48), **kwargs)
    assert sheet.size == layout.size and sheet.height > plain.height + 40 and sheet.width > plain.width
    for row, corners in zip(rows, layout.cells, strict=True):
        for image, (x, y) in zip(row, corners, strict=True):
            assert sheet.crop((x, y, x + 64, y + 48)).tobytes() == image.tobytes()
    texts = [t for _, t, _, _ in layout.texts]
    assert texts[0] == "step 120, training adapter off" and "turbo 8 steps cfg 1" in texts
    assert "zqx, a red circle on a" in texts and "blue background" in texts  # the prompt wraps in its column
    first_cell_top = layout.cells[0][0][1]
    assert text_pixels(sheet, (0, 0, sheet.width, first_cell_top - 14)) > 150  # title and prompts drawn
    assert text_pixels(sheet, (0, layout.cells[0][0][1] + 48, sheet.width, layout.cells[1][0][1])) > 40
    assert text_pixels(plain, (0, 0, plain.width, plain.height)) == 0


def test_wrap_keeps_lines_in_width_and_cuts_long_text():
    f = font(11)
    lines = wrap("zqx, a red circle on a yellow background", f, 100)
    assert len(lines) > 1 and all(text_width(line, f) <= 100 for line in lines)
    assert " ".join(lines) == "zqx, a red circle on a yellow background"
    long = wrap("a" * 80 + " word" * 40, f, 60, max_lines=3)
    assert len(long) == 3 and long[-1].endswith("…") and all(text_width(x, f) <= 60 for x in long)


def test_stack_puts_each_sheet_under_its_title():
    top, bottom = solid((200, 0, 0), (100, 40)), solid((0, 0, 200), (80, 40))
    out = stack([top, bottom], ["BEFORE", "AFTER"])
    a = np.asarray(out)
    assert out.width == 108 and out.height > 80 + 2 * 20
    reds, blues = np.argwhere(a[..., 0] == 200), np.argwhere(a[..., 2] == 200)
    assert len(reds) == 100 * 40 and len(blues) == 80 * 40 and reds[:, 0].max() < blues[:, 0].min()
    assert text_pixels(out, (0, 0, out.width, reds[:, 0].min())) > 20  # "BEFORE" is drawn above it


# ---- the demo end to end -----------------------------------------------------------------------------------


def test_demo_config_follows_the_steps(tmp_path):
    for steps in (1, 10, demo.DEMO_STEPS):
        cfg = demo.demo_config(tmp_path, steps)
        assert cfg.optim.warmup_steps < steps and cfg.preview.every == steps


def test_the_demo_learns_the_red_circle(tmp_path, capsys):
    """The demo's own command at half its steps: noise before, a red circle in the middle of both prompts'
    samples after (the full run is measured in the README)."""
    steps = demo.DEMO_STEPS // 2
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", str(steps)]) == 0
    run = tmp_path / "demo" / "zqx_circle"
    for name in ("zqx_circle.safetensors", "loss.png", "before_after.png"):
        assert (run / name).is_file(), name
    before = centre_red(Image.open(run / "previews" / "step000000.png"), 0)
    after = centre_red(Image.open(run / "previews" / f"step{steps:06d}.png"), steps)
    assert max(before) < 0.5 and min(after) > 0.8, (before, after)
    sheet, preview = Image.open(run / "before_after.png"), Image.open(run / "previews" / "step000000.png")
    assert sheet.width > preview.width and sheet.height > 2 * preview.height
    out = capsys.readouterr().out
    assert f"trained {steps} steps" in out and "before_after.png" in out


def test_a_ten_step_demo_runs(tmp_path):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "10"]) == 0
    assert (tmp_path / "demo" / "zqx_circle" / "previews" / "step000010.png").is_file()
    assert (tmp_path / "demo" / "zqx_circle" / "before_after.png").is_file()


def test_the_command_line_runs_the_demo_s_own_step_count():
    args = build_parser().parse_args(["demo"])
    assert args.steps == demo.DEMO_STEPS and args.out == "demo_output"
