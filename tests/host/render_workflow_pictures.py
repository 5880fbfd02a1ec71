"""Render the README's picture of each workflow: docs/workflows/<stem>.png for every workflows/*.json.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-python tests/host/render_workflow_pictures.py [STEM ...]

Not a test (pytest does not collect this file). It reuses the host tests' helpers: the tiny Z-Image files of
_tiny_models.py under the names the workflows use, a real ComfyUI started headless (--cpu) with this pack, and
headless Chromium over the DevTools protocol (_cdp.py) on ComfyUI's own frontend. Each workflow is loaded with
app.loadGraphData; any dialog the frontend opens (missing models, missing nodes) is reported and closed; the
frontend goes to focus mode (menus and side bars hidden) and fits the canvas to the graph (its "Fit view",
fitViewToSelectionAnimated, with a small margin); the page (1400x900, or 1600 wide and lower for a wide
graph) is captured and written as a palette PNG (Pillow) to stay small. Nodes the frontend does not know, or
an error toast, stop the script with the reason instead of writing a picture; a node whose widget values in
the frontend differ from the file's (a value shifted on load) is printed as a WARNING. STEM arguments render
only those workflows.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HOST_DIR = Path(__file__).resolve().parent
REPO = HOST_DIR.parents[1]
for entry in (str(REPO), str(HOST_DIR)):
    if entry not in sys.path:
        sys.path.insert(0, entry)

import _comfy_inproc as inproc  # noqa: E402
from _cdp import Browser, BrowserError, Page, find_chromium  # noqa: E402
from _tiny_models import write_tiny_models  # noqa: E402
from conftest import DATASET, WORKFLOWS, start_server, stop_server  # noqa: E402
from test_browser import SETTINGS, open_app, post_json  # noqa: E402

OUT = REPO / "docs" / "workflows"
WIDTH, HEIGHT = 1400, 900  # the page; a graph wider than that (aspect over WIDE) gets a wider, lower page
WIDE, WIDE_WIDTH, MIN_HEIGHT = 1.75, 1600, 640
RENDER_SETTINGS = {
    **SETTINGS,
    "LiteGraph.Canvas.MinFontSizeForLOD": 1,  # draw titles and widgets even when zoomed out to fit the graph
    "Comfy.Graph.CanvasInfo": False,  # no fps counter in the corner
    "Comfy.Graph.CanvasMenu": False,  # no zoom buttons over the graph
}
FIT = 0.96  # the part of the page the graph's bounds fill (the frontend's Fit view button uses 0.75)
MAX_BYTES = 300_000

LOAD = """(async () => {{
  const app = window.comfyAPI.app.app;
  await app.loadGraphData({workflow}, true, true, {name});
  return app.graph.nodes.length;
}})()"""
# Focus mode (the frontend hides its menus and side bars: the canvas is the whole page), nothing selected,
# then the frontend's "Fit view" (LGraphCanvas.fitViewToSelectionAnimated) with a small margin.
FIT_VIEW = """(async () => {{
  const app = window.comfyAPI.app.app;
  const workspace = () => document.querySelector('.comfy-menu-button-wrapper, .side-tool-bar-container');
  if (workspace()) await app.extensionManager.command.execute('Workspace.ToggleFocusMode');
  app.canvas.deselectAll();
  await new Promise(r => setTimeout(r, 300));
  app.canvas.fitViewToSelectionAnimated({{zoom: {fit}, duration: 50}});
  await new Promise(r => setTimeout(r, 400));
  app.canvas.setDirty(true, true);
  return {{scale: app.canvas.ds.scale, chrome: !!workspace()}};
}})()"""
# The graph's bounds (createBounds of the frontend: every node's boundingRect) and the frontend's own view of
# each node's widget values (what saving the workflow would write).
BOUNDS = """(() => {
  let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
  for (const n of window.comfyAPI.app.app.graph.nodes) {
    const [x, y, w, h] = n.boundingRect;
    x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
  }
  return [x0, y0, x1 - x0, y1 - y0];
})()"""
WIDGET_VALUES = """Object.fromEntries(window.comfyAPI.app.app.graph.nodes.map(n =>
  [n.id, n.serialize().widgets_values ?? null]))"""
# What must not be on the picture: nodes the frontend has no definition for, dialogs, error toasts.
PROBLEMS = """(() => {
  const app = window.comfyAPI.app.app;
  const unknown = app.graph.nodes.filter(n => n.has_errors || !window.LiteGraph.registered_node_types[n.type])
    .map(n => `${n.id} ${n.type}`);
  const dialogs = [...document.querySelectorAll('.p-dialog')].map(d => d.innerText.slice(0, 300));
  const toasts = [...document.querySelectorAll('.p-toast-message-error, .p-toast-message-warn')]
    .map(t => t.innerText.slice(0, 300));
  return {unknown, dialogs, toasts};
})()"""
CLOSE_DIALOGS = """(() => {
  const buttons = [...document.querySelectorAll(
    '.p-dialog .p-dialog-close-button, .p-dialog [aria-label=Close]')];
  buttons.forEach(b => b.click());
  return buttons.length;
})()"""


def small_png(png: bytes) -> bytes:
    """The screenshot as a palette PNG (the UI has few colours), or as taken if that is not smaller."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    for colors in (256, 128, 64):
        out = io.BytesIO()
        image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            out, "PNG", optimize=True)
        if out.tell() <= MAX_BYTES:
            break
    return out.getvalue() if out.tell() < len(png) else png


def set_page_size(page: Page, width: int, height: int) -> None:
    page.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
              mobile=False)
    page.wait_for(f"window.innerWidth === {width} && window.innerHeight === {height}", 10, "the page size")
    time.sleep(0.5)  # the canvas follows the window on its resize handler


def page_size(bounds: list[float]) -> tuple[int, int]:
    """WIDTHxHEIGHT, or for a wide graph WIDE_WIDTH wide and just high enough (at least MIN_HEIGHT)."""
    aspect = bounds[2] / max(bounds[3], 1.0)
    if aspect <= WIDE:
        return WIDTH, HEIGHT
    return WIDE_WIDTH, max(MIN_HEIGHT, min(HEIGHT, round(WIDE_WIDTH / aspect / FIT * 1.02)))


def widget_changes(data: dict, shown: dict) -> list[str]:
    """Nodes whose widget values in the frontend differ from the file's (a value the frontend shifted)."""
    changes = []
    for node in data["nodes"]:
        saved, now = node.get("widgets_values"), shown.get(str(node["id"]))
        if isinstance(saved, list) and saved != (now or []):
            changes.append(f"node {node['id']} ({node['type']}): file {saved!r}, frontend {now!r}")
    return changes


def render(page: Page, workflow: Path) -> dict:
    """Load one workflow, close dialogs, fit the view, write its picture; what was seen."""
    data = json.loads(workflow.read_text())
    page.evaluate("window.comfyAPI.app.app.graph.clear()")
    count = page.evaluate(LOAD.format(workflow=json.dumps(data), name=json.dumps(workflow.name)))
    if count != len(data["nodes"]):
        raise BrowserError(f"{workflow.name}: {count} nodes on the canvas, the file has {len(data['nodes'])}")
    time.sleep(2.0)  # the DOM widgets (notes, block editors) and the pack's scripts settle
    seen = page.evaluate(PROBLEMS)
    closed = []
    if seen["dialogs"]:
        closed = seen["dialogs"]
        page.evaluate(CLOSE_DIALOGS)
        page.wait_for("!document.querySelector('.p-dialog')", 10, "the dialogs to close")
    page.evaluate("document.querySelectorAll('.p-toast-message').forEach(t => t.remove())")
    if seen["unknown"] or seen["toasts"]:
        raise BrowserError(f"{workflow.name}: unknown or failing nodes {seen['unknown']}, "
                           f"error toasts {seen['toasts']}\n{page.console_tail()}")
    changed = widget_changes(data, page.evaluate(WIDGET_VALUES))
    for line in changed:
        print(f"WARNING {workflow.name}: the frontend does not show the saved widget values: {line}",
              file=sys.stderr, flush=True)
    size = page_size(page.evaluate(BOUNDS))
    set_page_size(page, *size)
    fit = page.evaluate(FIT_VIEW.format(fit=FIT))
    time.sleep(1.0)  # DOM widgets follow the canvas on the next frames
    OUT.mkdir(parents=True, exist_ok=True)
    target = OUT / f"{workflow.stem}.png"
    with tempfile.TemporaryDirectory() as tmp:
        png = page.screenshot(Path(tmp) / "shot.png")
    target.write_bytes(small_png(png))
    return {"picture": str(target.relative_to(REPO)), "bytes": target.stat().st_size,
            "size": f"{size[0]}x{size[1]}", "scale": round(fit["scale"], 3), "dialogs closed": closed,
            "widget values changed": len(changed)}


def main(stems: list[str]) -> int:
    comfyui = inproc.find_comfyui()
    chromium = find_chromium()
    if comfyui is None or chromium is None:
        print(inproc.skip_reason() if comfyui is None else "no Chromium (apt-get install chromium, or "
              "CHROMIUM_PATH)", file=sys.stderr)
        return 2
    workflows = sorted(WORKFLOWS.glob("*.json"))
    if stems:
        workflows = [w for w in workflows if w.stem in stems]
        missing = set(stems) - {w.stem for w in workflows}
        if missing:
            print(f"no workflow named {sorted(missing)} in {WORKFLOWS}", file=sys.stderr)
            return 2
    base = Path(tempfile.mkdtemp(prefix="zit-render-"))
    try:
        (base / "custom_nodes").mkdir()
        (base / "custom_nodes" / "zit-trainer").symlink_to(REPO, target_is_directory=True)
        inproc._torchaudio_or_stand_in()
        print("writing the tiny Z-Image files ...", flush=True)
        write_tiny_models(comfyui, base)
        from trainer.demo import make_dataset

        make_dataset(base / "input" / DATASET, n=3, size=256)
        print("starting ComfyUI ...", flush=True)
        proc, comfy = start_server(comfyui, base)
        try:
            post_json(comfy, "/api/settings", RENDER_SETTINGS)
            browser = Browser(chromium, WIDTH, HEIGHT)
            try:
                assert browser.page is not None
                open_app(browser.page, comfy.url)
                for workflow in workflows:
                    print(workflow.name, render(browser.page, workflow), flush=True)
            finally:
                browser.close()
        finally:
            stop_server(proc)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
