"""The pack's browser side in headless Chromium on ComfyUI's own frontend (comfyui-frontend-package), served
by the host tests' real server: the ZIT sidebar panel showing a real training job's live loss, and the
block-weight editor inside the block-weight LoRA node.

Chromium is driven over the DevTools protocol (_cdp.py): real mouse clicks on the sidebar button, the panel's
buttons and the sliders, litegraph's text prompt typed into with key events, DOM and canvas pixels read back
with JavaScript. The panel's screenshot is written to tests/host/artifacts/zit_panel.png.

Skipped with the reason when there is no ComfyUI checkout (see conftest.py) or no Chromium (Debian's
`chromium`, or CHROMIUM_PATH).
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from _cdp import Browser, BrowserError, Page, find_chromium
from _training_helpers import train_prompt as training_prompt
from conftest import WORKFLOWS, ComfyClient

from trainer.demo import make_dataset
from trainer.lora.blocks import resolve
from trainer.lora.spec import VECTOR_BLOCKS

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
SCREENSHOT = ARTIFACTS / "zit_panel.png"
CHROMIUM = find_chromium()
SETTINGS = {  # a first visit would open the template browser over the canvas
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
}
APP_READY = ("!!(window.comfyAPI?.app?.app?.graph && window.LiteGraph "
             "&& document.querySelector('.zit-trainer-tab-button'))")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium: install Debian's chromium (apt-get install chromium) or set CHROMIUM_PATH")


def post_json(comfy: ComfyClient, path: str, body: dict) -> dict:
    req = urllib.request.Request(comfy.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        raw = r.read()
        return json.loads(raw) if raw.strip() else {}


def open_app(page: Page, url: str) -> None:
    page.call("Page.navigate", url=url + "/")
    page.wait_for(APP_READY, 120, "ComfyUI's frontend with the ZIT sidebar button")


@pytest.fixture(scope="module")
def page(comfy: ComfyClient):
    """A headless Chromium page on the test server's ComfyUI frontend."""
    post_json(comfy, "/api/settings", SETTINGS)
    browser = Browser(CHROMIUM)
    try:
        assert browser.page is not None
        open_app(browser.page, comfy.url)
        yield browser.page
    finally:
        browser.close()


# --------------------------------------------------------------------------------------------------
# The block-weight editor
# --------------------------------------------------------------------------------------------------

ADD_NODE = """(async () => {
  const app = window.comfyAPI.app.app;
  app.graph.clear();
  const node = window.LiteGraph.createNode("ZITLoraLoaderBlockWeight");
  node.pos = [80, 80];
  app.graph.add(node);
  app.canvas.ds.offset = [0, 0];
  app.canvas.ds.scale = 1;
  app.graph.setDirtyCanvas(true, true);
  window.zitTestNode = node;
  return node.id;
})()"""
WIDGETS = "Object.fromEntries(window.zitTestNode.widgets.map(w => [w.name, w.value]))"
SLIDERS = """Object.fromEntries([...document.querySelectorAll('.zit-bw-slider')].map(s =>
  [s.dataset.key, Number(s.value)]))"""
STATUS = "document.querySelector('.zit-bw-status')?.textContent || ''"


def slider_box(page: Page, key: str) -> dict:
    return page.evaluate(f"""(() => {{
        const r = document.querySelector('.zit-bw-slider[data-key="{key}"]').getBoundingClientRect();
        return {{x: r.x, y: r.y, width: r.width, height: r.height}};
    }})()""")


def press_enter(page: Page) -> None:
    page.call("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13,
              text="\r")
    page.call("Input.dispatchKeyEvent", type="keyUp", key="Enter", code="Enter", windowsVirtualKeyCode=13)


def type_into_widget(page: Page, name: str, text: str) -> None:
    """Click a text widget on the canvas, type into litegraph's prompt, press Enter (as a user does)."""
    point = page.evaluate(f"""(() => {{
        const node = window.zitTestNode, app = window.comfyAPI.app.app;
        const w = node.widgets.find(w => w.name === {json.dumps(name)});
        const h = window.LiteGraph.NODE_WIDGET_HEIGHT;
        const [x, y] = app.canvas.ds.convertOffsetToCanvas(
            [node.pos[0] + node.size[0] / 2, node.pos[1] + w.y + h / 2]);
        const r = app.canvas.canvas.getBoundingClientRect();
        return [r.x + x, r.y + y];
    }})()""")
    page.click(*point)
    field = "document.querySelector('.graphdialog input, .graphdialog textarea')"
    page.wait_for(f"!!{field}", 10, "the text prompt")
    page.evaluate(f"{field}.select()")
    page.call("Input.insertText", text=text)
    press_enter(page)
    page.wait_for("!document.querySelector('.graphdialog')", 10, "the prompt to close")


def test_block_editor_sliders_and_text_stay_in_sync(page: Page):
    page.evaluate(ADD_NODE)
    page.wait_for(f"({STATUS}).startsWith(\"preset 'all'\")", 30, "the editor resolved the default text")
    sliders = page.evaluate(SLIDERS)
    assert len([k for k in sliders if k.startswith("b:")]) == 35, sliders
    assert len([k for k in sliders if k.startswith("c:")]) == 8, sliders
    assert set(sliders.values()) == {1.0}

    # a real click near the top of L10's (vertical) slider: the blocks widget becomes the 35-value vector
    box = slider_box(page, "b:L10")
    page.click(box["x"] + box["width"] / 2, box["y"] + box["height"] * 0.2)
    page.wait_for(f"({WIDGETS}).blocks.split(',').length === 35", 10, "the vector in the blocks widget")
    widgets = page.evaluate(WIDGETS)
    vector = [float(v) for v in widgets["blocks"].split(",")]
    at = VECTOR_BLOCKS.index("L10")
    assert 1.3 <= vector[at] <= 2.0, widgets
    assert vector[:at] + vector[at + 1:] == [1.0] * 34, widgets
    assert page.evaluate(SLIDERS)["b:L10"] == vector[at]
    assert resolve(widgets["blocks"], widgets["components"]).blocks == tuple(vector)

    # a value outside the sliders' range, typed into the focused slider's number field
    assert page.evaluate("document.querySelector('.zit-bw-focus-name').textContent") == "L10 ="
    page.click_element(".zit-bw-number")
    page.evaluate("document.querySelector('.zit-bw-number').select()")
    page.call("Input.insertText", text="2.5")
    press_enter(page)
    page.wait_for(f"({WIDGETS}).blocks.split(',')[{at}] === '2.5'", 10, "L10 = 2.5 in the vector")
    assert page.evaluate("document.querySelector('.zit-bw-slider[data-key=\"b:L10\"]')"
                         ".classList.contains('zit-bw-outside')")

    # the bottom of the adaLN slider: 0, written as component text
    box = slider_box(page, "c:adaLN")
    page.click(box["x"] + box["width"] / 2, box["y"] + box["height"] - 2)
    page.wait_for(f"({WIDGETS}).components === 'adaLN=0'", 10, "adaLN=0 in the components widget")

    # typing a preset name into the blocks widget moves the sliders (the components text stays)
    type_into_widget(page, "blocks", "late")
    page.wait_for(f"({SLIDERS})['b:L05'] === 0 && ({SLIDERS})['b:L25'] === 1", 15, "the sliders of 'late'")
    sliders = page.evaluate(SLIDERS)
    expected = resolve("late", "adaLN=0")
    assert [sliders[f"b:{b}"] for b in VECTOR_BLOCKS] == list(expected.blocks)
    assert sliders["c:adaLN"] == 0 and sliders["c:q"] == 1
    assert page.evaluate(WIDGETS)["blocks"] == "late"

    # invalid text: the server's message, naming the token; the sliders stay
    type_into_widget(page, "blocks", "L10-19=0.5,X7=1")
    page.wait_for(f"({STATUS}).includes('X7')", 15, "the refusal naming X7")
    assert page.evaluate("document.querySelector('.zit-bw').classList.contains('zit-bw-invalid')")
    assert page.evaluate(SLIDERS)["b:L05"] == 0

    # the preset menu replaces both texts
    page.evaluate("""(() => { const s = document.querySelector('.zit-bw-select');
        s.value = 'attention-only'; s.dispatchEvent(new Event('change')); })()""")
    page.wait_for(f"({SLIDERS})['c:w1'] === 0 && ({SLIDERS})['b:BASE'] === 0", 15,
                  "the sliders of 'attention-only'")
    assert page.evaluate(WIDGETS)["blocks"] == "attention-only" and page.evaluate(WIDGETS)["components"] == ""
    assert not page.evaluate("document.querySelector('.zit-bw').classList.contains('zit-bw-invalid')")
    # the editor is not a saved widget: the workflow keeps four widget values, the prompt four inputs
    assert page.evaluate("window.zitTestNode.serialize().widgets_values.length") == 4
    inputs = page.evaluate("""(async () => {
        const prompt = await window.comfyAPI.app.app.graphToPrompt();
        return prompt.output[String(window.zitTestNode.id)].inputs;
    })()""")
    assert set(inputs) == {"lora_name", "strength", "blocks", "components"}, inputs


def test_block_editor_on_a_saved_workflow(page: Page):
    """A workflow from before the editor keeps its layout (sliders hidden) and shows each node's text."""
    workflow = json.loads((WORKFLOWS / "zit_block_weight_exploration.json").read_text())
    saved = {n["id"]: n for n in workflow["nodes"] if n["type"] == "ZITLoraLoaderBlockWeight"}
    assert len(saved) >= 2
    page.evaluate(f"window.comfyAPI.app.app.loadGraphData({json.dumps(workflow)})")
    editors = f"""(() => {{
        const app = window.comfyAPI.app.app;
        return Object.fromEntries({json.dumps(list(saved))}.map(id => {{
            const node = app.graph.getNodeById(id), editor = node?.zitBlockEditor;
            return [id, editor && {{
                status: editor.status?.textContent || '', preset: editor.presetSelect?.value,
                closed: editor.element.classList.contains('zit-bw-closed'), size: [...node.size],
                sliders: Object.fromEntries([...editor.element.querySelectorAll('.zit-bw-slider')]
                    .map(s => [s.dataset.key, Number(s.value)]))}}];
        }}));
    }})()"""
    page.wait_for(f"Object.values({editors}).every(e => e && / blocks changed/.test(e.status))", 30,
                  "every editor resolved its node's text")
    shown = page.evaluate(editors)
    for node_id, node in saved.items():
        editor, (_, _, blocks, components) = shown[str(node_id)], node["widgets_values"]
        assert editor["closed"] and editor["size"][0] == node["size"][0], (node_id, editor)
        expected = resolve(blocks, components)
        assert [editor["sliders"][f"b:{b}"] for b in VECTOR_BLOCKS] == list(expected.blocks), node_id
        assert editor["preset"] == ("all" if blocks == "all" else ""), (node_id, editor["preset"])
    # opening one shows its sliders, and the node grows to hold them
    node_id = next(i for i, n in saved.items() if n["widgets_values"][2] != "all")
    page.evaluate(f"window.comfyAPI.app.app.graph.getNodeById({node_id}).zitBlockEditor.toggle.click()")
    opened = page.evaluate(editors)[str(node_id)]
    assert not opened["closed"] and opened["size"][0] >= 600, opened
    assert page.evaluate(f"window.comfyAPI.app.app.graph.getNodeById({node_id}).properties"
                         ".zit_block_editor_open") is True


# --------------------------------------------------------------------------------------------------
# The panel with a live training job
# --------------------------------------------------------------------------------------------------

CHART = "document.querySelector('.zit-loss-chart')"
CHART_PIXELS = f"""(() => {{
  const c = {CHART};
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let painted = 0, line = 0;
  for (let i = 0; i < d.length; i += 4) {{
    if (d[i + 3] > 0) painted++;
    if (d[i + 3] > 128 && d[i + 2] > 190 && d[i] < 140 && d[i + 1] > 100 && d[i + 1] < 190) line++;
  }}
  return {{painted, line, width: c.width, height: c.height}};
}})()"""
RUN = "zit_browser_panel"
DATASET = "zit_browser_dataset"  # under the server's input/ folder
ADVANCED = ("[preview]\nwidth = 64\nheight = 64\nturbo_steps = 2\nhealth_every = 3\nhealth_size = 32\n\n"
            "[save]\nkeep_last = 0\n")
HEALTH = "document.querySelector('.zit-health-chart')"
STEPS = 200  # the test stops the job from the panel long before


def train_prompt() -> dict:
    """The tiny files -> ZIT Dataset (64 px) -> ZIT Train (rank 4, sft; previews and saves every 3 steps)."""
    return training_prompt(RUN, steps=STEPS, turbo="sft", adapter="none", advanced=ADVANCED, dataset=DATASET,
                           every=3)


def jobs_running(comfy: ComfyClient) -> list[dict]:
    return [j for j in comfy.get("/zit/jobs")["jobs"] if j["status"] in ("running", "stopping")]


def stop_all(comfy: ComfyClient) -> None:
    """Stop every job still running and wait until they have ended (the server trains one job at a time)."""
    for job in jobs_running(comfy):
        with contextlib.suppress(urllib.error.HTTPError):
            post_json(comfy, f"/zit/jobs/{job['id']}/stop", {})
    end = time.monotonic() + 300
    while jobs_running(comfy) and time.monotonic() < end:
        time.sleep(0.5)
    assert not jobs_running(comfy), f"jobs still running after stop: {jobs_running(comfy)}"


def open_panel(page: Page) -> None:
    """Click the ZIT sidebar button until the panel shows (a click while the frontend swaps workflows is
    lost)."""
    is_open = "!!document.querySelector('.zit-panel')"
    for _ in range(5):
        if page.evaluate(is_open):
            return
        page.click_element(".zit-trainer-tab-button")
        with contextlib.suppress(BrowserError):
            page.wait_for(is_open, 4, "the ZIT panel")
    page.wait_for(is_open, 1, "the ZIT panel")


def row_of(job_id: str) -> str:
    """JavaScript: the panel's row of a job (or null)."""
    return f"document.querySelector('.zit-job[data-job-id=\"{job_id}\"]')"


def row(page: Page, job_id: str) -> dict | None:
    return page.evaluate(f"""(() => {{
        const r = {row_of(job_id)};
        return r && {{status: r.dataset.status, step: Number(r.dataset.step || 0),
                      steps: Number(r.dataset.steps || 0), text: r.innerText,
                      selected: r.classList.contains('zit-selected')}};
    }})()""")


def chart_points(job_id: str) -> str:
    return f"(({CHART})?.dataset.jobId === '{job_id}' ? Number(({CHART}).dataset.points) : 0)"


def test_panel_shows_a_live_training_job(comfy: ComfyClient, base_dir: Path, page: Page):
    make_dataset(base_dir / "input" / DATASET, n=3, size=256)
    stop_all(comfy)
    page.evaluate(f"window.comfyAPI.app.app.loadApiJson({json.dumps(train_prompt())}, 'zit_training.json')")
    open_panel(page)  # open before the job exists: what follows arrives through the zit.* events
    before = {j["id"] for j in comfy.get("/zit/jobs")["jobs"]}
    try:
        comfy.run(train_prompt(), timeout=600)  # returns once the job has started
        [job] = [j for j in comfy.get("/zit/jobs")["jobs"] if j["id"] not in before]
        job_id = job["id"]
        page.wait_for(f"!!{row_of(job_id)}", 30, "the job's row")
        page.click_element(f'.zit-job[data-job-id="{job_id}"]')

        # live loss: points drawn for this job, the step count in its row going up
        first = page.wait_for(f"{chart_points(job_id)} >= 3 && {chart_points(job_id)}", 300,
                              "three loss points on the chart")
        step = row(page, job_id)["step"]
        assert step >= 3
        page.wait_for(f"{chart_points(job_id)} > {first}", 120, "more loss points")
        page.wait_for(f"Number({row_of(job_id)}.dataset.step) > {step}", 120, "the step count to go up")
        shown = row(page, job_id)
        assert shown["status"] == "running" and shown["steps"] == STEPS and shown["selected"], shown
        assert f"/{STEPS}" in shown["text"] and "it/s" in shown["text"] and "loss" in shown["text"], shown
        pixels = page.evaluate(CHART_PIXELS)
        assert pixels["line"] > 20, f"the smoothed loss line is not on the canvas: {pixels}"

        # a preview image arrives and loads
        page.wait_for("[...document.querySelectorAll('.zit-preview-main')]"
                      ".some(i => i.complete && i.naturalWidth > 0)", 300, "a preview image in the panel")
        stats = page.evaluate("Object.fromEntries([...document.querySelectorAll('.zit-stat')].map(s => "
                              "[s.children[0].textContent, s.children[1].textContent]))")
        assert set(stats) == {"step", "loss", "lr", "it/s", "ETA", "mem", "plan", "turbo health"}, stats
        assert stats["lr"] != "–" and stats["loss"] != "–" and stats["it/s"] != "–", stats
        page.wait_for(f"{chart_points(job_id)} >= 8", 120, "eight loss points")
        # turbo health: the second chart, one point per measurement (every 3 steps), the scale in its title
        page.wait_for(f"Number({HEALTH}.dataset.points) >= 2", 120, "two turbo-health points")
        title = page.evaluate(f"{HEALTH}.parentElement.innerText")
        assert "1 = as turbo as the base" in title and "warning above 2" in title, title
        assert "at step" in page.evaluate("document.querySelector('.zit-stats').innerText")
        time.sleep(0.5)  # the next frame has drawn
        png = page.screenshot(SCREENSHOT)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

        # a reload: the panel rebuilds its state from the routes (the series, not only the latest step)
        drawn = page.evaluate(chart_points(job_id))
        page.evaluate("window.zitBeforeReload = true")
        page.call("Page.reload")  # the frontend asks about the unsaved workflow: _cdp accepts such dialogs
        page.wait_for(f"!window.zitBeforeReload && {APP_READY}", 120, "ComfyUI after the reload")
        open_panel(page)
        page.wait_for(f"!!{row_of(job_id)}", 30, "the row after the reload")
        page.click_element(f'.zit-job[data-job-id="{job_id}"]')
        page.wait_for(f"{chart_points(job_id)} >= {drawn}", 30, "the loss series after the reload")
        page.wait_for(f"Number({HEALTH}.dataset.points) >= 2", 30, "the health series after the reload")

        # stop from the panel: the job saves and ends as stopped, and can be resumed
        page.click_element(".zit-stop")
        page.wait_for(f"{row_of(job_id)}.dataset.status === 'stopped'", 300, "the job to stop")
        page.wait_for("!!document.querySelector('.zit-resume')", 30, "the Resume button")
        assert comfy.get(f"/zit/jobs/{job_id}")["job"]["status"] == "stopped"
        page.click_element(".zit-resume")
        resumed = page.wait_for(f"""(() => {{
            const r = [...document.querySelectorAll('.zit-job')].find(r => r.dataset.jobId !== '{job_id}'
                && !{json.dumps(sorted(before))}.includes(r.dataset.jobId));
            return r && r.dataset.status === 'running' && Number(r.dataset.step) > 0 && r.dataset.jobId;
        }})()""", 300, "the resumed job training")
        assert comfy.get(f"/zit/jobs/{resumed}")["job"]["last"]["progress"]["step"] > 0
        ours = [line for line in page.console if "zit" in line.lower()
                and line.startswith(("[error]", "[exception]", "[warning]"))]
        assert not ours, "the pack's scripts complained:\n" + "\n".join(ours)
    finally:
        stop_all(comfy)
