// zit-trainer: a block-weight editor inside the "ZIT LoRA Loader (Block Weight)" node.
//
// 34 block sliders (L00..L29, NR0, NR1, CR0, CR1) plus BASE (the embedders and final layer, which belong to no
// block) as a separate slider, 8 component multipliers and the preset menu, kept in sync with the node's text
// widgets: moving a slider writes the 35-value vector into `blocks` (and the multipliers into `components`);
// editing either text, or choosing a preset, moves the sliders. The text is never parsed here: the server's
// POST /zit/blocks/resolve (the same parser the node runs) resolves it, and its refusal is shown as is.
import { app } from "../../scripts/app.js";
import { addStyle, el, getJSON, postJSON } from "./zit_api.js";

const NODE = "ZITLoraLoaderBlockWeight";
const MIN = 0;
const MAX = 2;
const STEP = 0.05;
const POLL_MS = 300; // the text widgets are also edited outside our callbacks (undo, paste, workflow load)
const DEBOUNCE_MS = 150;
const WIDTH = 600; // 35 + 8 sliders
const OPEN = "zit_block_editor_open"; // node property: sliders shown (saved with the workflow)
const HEIGHT = { open: 310, closed: 48 };

let presetsRequest = null;

/** GET /zit/blocks/presets once per page (retried after a failure). */
function loadPresets() {
  presetsRequest ??= getJSON("/zit/blocks/presets").catch((e) => {
    presetsRequest = null;
    throw e;
  });
  return presetsRequest;
}

/** Shortest text of a weight: 1, 0.5, 0.35 (JS number text, which the server's parser reads back exactly). */
function weightText(x) {
  return String(Number(x));
}

function sameWeights(a, b) {
  return a.length === b.length && a.every((x, i) => Math.abs(x - b[i]) < 1e-9);
}

function shortName(block) {
  if (block === "BASE") return "BASE";
  if (block.startsWith("L")) return Number(block.slice(1)) % 5 === 0 ? block.slice(1) : "";
  return block;
}

class BlockEditor {
  constructor(node) {
    this.node = node;
    this.blocksWidget = node.widgets?.find((w) => w.name === "blocks");
    this.componentsWidget = node.widgets?.find((w) => w.name === "components");
    this.synced = { blocks: null, components: null }; // the texts the sliders show
    this.request = 0;
    this.names = null;
    this.componentNames = null;
    this.presets = {};
    this.weights = null; // {blocks: [35], components: {...}}
    this.focus = null; // {kind: "block"|"component", index|name}
    this.sliders = new Map(); // key -> input
    this.element = el("div.zit-bw", {}, el("div.zit-bw-muted", {}, "Loading the block-weight editor…"));
    this.widget = node.addDOMWidget("block_editor", "zit_block_editor", this.element, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => (this.open ? HEIGHT.open : HEIGHT.closed),
      getMaxHeight: () => (this.open ? HEIGHT.open + 20 : HEIGHT.closed),
      getValue: () => undefined,
      setValue: () => {},
    });
    this.widget.serialize = false;
    for (const w of [this.blocksWidget, this.componentsWidget]) {
      if (!w) continue;
      const callback = w.callback;
      w.callback = (...args) => {
        const out = callback?.apply(w, args);
        this.schedule(0);
        return out;
      };
    }
    this.timer = setInterval(() => this.poll(), POLL_MS);
    this.build();
  }

  async build() {
    if (!this.blocksWidget || !this.componentsWidget) {
      this.element.replaceChildren(el("div.zit-bw-error", {}, "This node has no blocks/components widgets."));
      return;
    }
    let body;
    try {
      body = await loadPresets();
    } catch (e) {
      this.element.replaceChildren(el("div.zit-bw-error", {},
        `The block-weight routes did not answer (${e.message}); edit the text widgets directly.`));
      return;
    }
    this.names = body.blocks;
    this.componentNames = body.components;
    this.presets = body.presets;
    this.render();
    this.poll(true);
  }

  // -- the DOM ------------------------------------------------------------------------------------------------

  slider(key, label, title, onInput) {
    const input = el("input.zit-bw-slider", {
      type: "range", min: String(MIN), max: String(MAX), step: String(STEP), value: "1",
      "aria-label": title, title, dataset: { key },
    });
    input.addEventListener("input", () => onInput(Number(input.value)));
    input.addEventListener("focus", () => this.setFocus(key)); // clicked or tabbed to (not hovered: the mouse
    input.addEventListener("pointerdown", () => this.setFocus(key)); // crosses other sliders on its way)
    input.addEventListener("dblclick", () => onInput(1));
    this.sliders.set(key, input);
    return el("div.zit-bw-cell", { dataset: { key } }, input, el("span.zit-bw-label", {}, label));
  }

  render() {
    this.sliders.clear();
    this.presetSelect = el("select.zit-bw-select", { title: "A preset replaces both texts (blocks and components)" },
      el("option", { value: "" }, "custom"),
      Object.entries(this.presets).map(([name, p]) => el("option", {
        value: name,
        title: [p.text, p.components_text].filter(Boolean).join(" · "),
      }, name)));
    this.presetSelect.addEventListener("change", () => this.choosePreset(this.presetSelect.value));
    const blockCells = this.names.map((name, i) => this.slider(`b:${name}`, shortName(name), name,
      (v) => this.setBlock(i, v)));
    const base = blockCells[0];
    const main = blockCells.slice(1, 31);
    const noise = blockCells.slice(31, 33);
    const context = blockCells.slice(33, 35);
    const componentCells = this.componentNames.map((name) => this.slider(`c:${name}`, name, `${name} multiplier`,
      (v) => this.setComponent(name, v)));
    this.focusName = el("span.zit-bw-focus-name", {}, "click a slider:");
    this.focusInput = el("input.zit-bw-number", {
      type: "number", step: String(STEP), title: "Type any value (also outside 0..2)", disabled: true,
    });
    this.focusInput.addEventListener("change", () => this.typeValue());
    this.focusInput.addEventListener("keydown", (e) => {
      e.stopPropagation(); // typing here is not a canvas shortcut (Delete would remove the node)
      if (e.key === "Enter") this.typeValue();
    });
    this.status = el("div.zit-bw-status");
    this.toggle = el("button.zit-bw-button.zit-bw-toggle", { onclick: () => this.setOpen(!this.open) });
    this.element.replaceChildren(
      el("div.zit-bw-row",
        this.toggle,
        el("label.zit-bw-title", {}, "Preset ", this.presetSelect),
        el("button.zit-bw-button", { title: "Every block and component 1", onclick: () => this.choosePreset("all") },
          "Reset"),
        el("span.zit-bw-spacer"),
        el("span.zit-bw-focus", {}, this.focusName, this.focusInput)),
      el("div.zit-bw-sliders",
        el("div.zit-bw-group-title", {}, "Blocks (0–2; double-click = 1)"),
        el("div.zit-bw-blocks",
          el("div.zit-bw-group", { title: "BASE: embedders and final layer (no block)" }, base),
          el("div.zit-bw-group.zit-bw-main", { title: "Main layers L00..L29" }, main),
          el("div.zit-bw-group", { title: "Noise refiners" }, noise),
          el("div.zit-bw-group", { title: "Context refiners" }, context)),
        el("div.zit-bw-group-title", {}, "Components"),
        el("div.zit-bw-blocks", el("div.zit-bw-group.zit-bw-components", {}, componentCells))),
      this.status);
    this.showOpen();
    this.showWeights();
  }

  // -- open (sliders shown) or closed (preset menu and status only) ---------------------------------------------

  get open() {
    return this.node.properties?.[OPEN] !== false;
  }

  setOpen(open) {
    this.node.properties[OPEN] = open;
    this.showOpen();
    this.fitNode();
  }

  showOpen() {
    this.element.classList.toggle("zit-bw-closed", !this.open);
    if (this.toggle) {
      this.toggle.textContent = this.open ? "▾ sliders" : "▸ sliders";
      this.toggle.title = this.open ? "Hide the sliders" : "Show the sliders";
    }
  }

  /** Size the node to the editor: wide enough for the sliders when open, no taller than needed when closed. */
  fitNode() {
    const node = this.node;
    const [, height] = node.computeSize();
    const width = this.open ? Math.max(node.size[0], WIDTH) : node.size[0];
    node.setSize([width, this.open ? Math.max(node.size[1], height) : height]);
    node.setDirtyCanvas?.(true, true);
  }

  setFocus(key) {
    this.focus = key;
    this.showFocus();
  }

  showFocus() {
    if (!this.focus || !this.weights) return;
    const [kind, name] = this.focus.split(":");
    const value = kind === "b" ? this.weights.blocks[this.names.indexOf(name)] : this.weights.components[name];
    this.focusName.textContent = `${name} =`;
    this.focusInput.disabled = false;
    if (document.activeElement !== this.focusInput) this.focusInput.value = weightText(value);
  }

  showWeights() {
    if (!this.weights || !this.presetSelect) return;
    this.names.forEach((name, i) => this.showSlider(`b:${name}`, name, this.weights.blocks[i]));
    for (const name of this.componentNames) this.showSlider(`c:${name}`, name, this.weights.components[name]);
    this.presetSelect.value = this.matchingPreset();
    this.showFocus();
  }

  showSlider(key, name, value) {
    const input = this.sliders.get(key);
    if (!input) return;
    if (Number(input.value) !== value) input.value = String(value);
    const outside = value < MIN || value > MAX;
    input.classList.toggle("zit-bw-outside", outside);
    input.classList.toggle("zit-bw-changed", value !== 1);
    input.title = `${name} = ${weightText(value)}${outside ? " (outside the slider range)" : ""}`;
    input.dataset.value = weightText(value);
  }

  matchingPreset() {
    const text = String(this.blocksWidget.value ?? "").trim().toLowerCase();
    const components = String(this.componentsWidget.value ?? "").trim();
    if (!components && this.presets[text]) return text;
    for (const [name, p] of Object.entries(this.presets)) {
      const comps = this.componentNames.map((c) => p.components[c]);
      const mine = this.componentNames.map((c) => this.weights.components[c]);
      if (sameWeights(p.blocks, this.weights.blocks) && sameWeights(comps, mine)) return name;
    }
    return "";
  }

  showStatus(message, error = false) {
    if (!this.status) return;
    this.status.textContent = message;
    this.status.className = error ? "zit-bw-status zit-bw-error" : "zit-bw-status zit-bw-muted";
    this.element.classList.toggle("zit-bw-invalid", error);
  }

  // -- sliders -> text ----------------------------------------------------------------------------------------

  setBlock(index, value) {
    if (!this.weights) return;
    this.weights.blocks[index] = value;
    this.writeText();
  }

  setComponent(name, value) {
    if (!this.weights) return;
    this.weights.components[name] = value;
    this.writeText();
  }

  typeValue() {
    const value = Number(this.focusInput.value);
    if (!this.focus || this.focusInput.value.trim() === "" || !Number.isFinite(value)) {
      this.showStatus(`${this.focusInput.value}: not a number`, true);
      return;
    }
    const [kind, name] = this.focus.split(":");
    if (kind === "b") this.setBlock(this.names.indexOf(name), value);
    else this.setComponent(name, value);
  }

  /** The sliders' weights as text: the 35-value vector, and the components that are not 1 (empty: all 1). */
  writeText() {
    const blocks = this.weights.blocks.map(weightText).join(",");
    const components = this.componentNames
      .filter((c) => this.weights.components[c] !== 1)
      .map((c) => `${c}=${weightText(this.weights.components[c])}`)
      .join(",");
    this.request += 1; // an answer for older text must not move the sliders back
    this.setWidget(this.blocksWidget, blocks);
    this.setWidget(this.componentsWidget, components);
    this.synced = { blocks, components };
    this.showWeights();
    this.showStatus(`${this.names.length}-value vector written to 'blocks'`);
  }

  setWidget(widget, text) {
    if (widget.value === text) return;
    widget.value = text;
    this.node.setDirtyCanvas?.(true, true);
    this.node.graph?.setDirtyCanvas?.(true, true);
  }

  // -- text -> sliders ----------------------------------------------------------------------------------------

  choosePreset(name) {
    if (!name) return;
    this.setWidget(this.blocksWidget, name);
    this.setWidget(this.componentsWidget, "");
    this.schedule(0);
  }

  poll(force = false) {
    if (!this.names) return;
    const blocks = String(this.blocksWidget.value ?? "");
    const components = String(this.componentsWidget.value ?? "");
    if (force || blocks !== this.synced.blocks || components !== this.synced.components) this.schedule();
  }

  schedule(delay = DEBOUNCE_MS) {
    if (!this.names) return;
    clearTimeout(this.debounce);
    this.debounce = setTimeout(() => this.resolveText(), delay);
  }

  async resolveText() {
    const blocks = String(this.blocksWidget.value ?? "");
    const components = String(this.componentsWidget.value ?? "");
    this.synced = { blocks, components };
    const request = ++this.request;
    try {
      const answer = await postJSON("/zit/blocks/resolve", { blocks, components });
      if (request !== this.request) return;
      this.weights = { blocks: answer.blocks, components: answer.components };
      this.showWeights();
      this.showStatus(this.describe(blocks));
    } catch (e) {
      if (request !== this.request) return;
      this.showStatus(e.message, true);
    }
  }

  describe(blocks) {
    const off = this.weights.blocks.filter((x) => x === 0).length;
    const changed = this.weights.blocks.filter((x) => x !== 1).length;
    const what = this.presets[blocks.trim().toLowerCase()] ? `preset '${blocks.trim()}'` : "text";
    return `${what}: ${changed} of ${this.weights.blocks.length} blocks changed, ${off} off`;
  }

  remove() {
    clearInterval(this.timer);
    clearTimeout(this.debounce);
  }
}

const CSS = `
.zit-bw { display: flex; flex-direction: column; gap: 4px; font-size: 11px; color: var(--fg-color, #ddd);
  padding: 4px 2px; box-sizing: border-box; }
.zit-bw-row { display: flex; align-items: center; gap: 6px; }
.zit-bw-spacer { flex: 1; }
.zit-bw-select, .zit-bw-number, .zit-bw-button { font-size: 11px; background: var(--comfy-input-bg, #222);
  color: inherit; border: 1px solid var(--border-color, #555); border-radius: 4px; padding: 1px 4px; }
.zit-bw-button { cursor: pointer; }
.zit-bw-number { width: 58px; }
.zit-bw-focus { display: flex; align-items: center; gap: 4px; font-family: ui-monospace, monospace; }
.zit-bw-group-title { opacity: 0.7; margin-top: 2px; }
.zit-bw-blocks { display: flex; gap: 6px; align-items: stretch; }
.zit-bw-group { display: flex; gap: 1px; padding: 2px; border-radius: 4px;
  background: var(--comfy-input-bg, rgba(128,128,128,0.1)); }
.zit-bw-main { flex: 1; }
.zit-bw-components { flex: 0 1 auto; gap: 6px; padding: 2px 6px; }
.zit-bw-cell { display: flex; flex-direction: column; align-items: center; flex: 1 1 0; min-width: 10px; }
.zit-bw-slider { writing-mode: vertical-lr; direction: rtl; width: 12px; height: 88px; margin: 0;
  accent-color: #4f8cff; cursor: ns-resize; }
.zit-bw-slider.zit-bw-changed { accent-color: #f0a040; }
.zit-bw-slider.zit-bw-outside { accent-color: #e05050; }
.zit-bw-label { font-size: 9px; opacity: 0.7; height: 11px; white-space: nowrap; }
.zit-bw-status { min-height: 14px; }
.zit-bw-muted { opacity: 0.7; }
.zit-bw-error { color: #ff6b6b; }
.zit-bw-invalid .zit-bw-blocks { opacity: 0.45; }
.zit-bw-closed .zit-bw-sliders, .zit-bw-closed .zit-bw-focus { display: none; }
.zit-bw-toggle { white-space: nowrap; }
`;

app.registerExtension({
  name: "zit.trainer.blockEditor",
  setup() {
    addStyle("zit-block-editor-style", CSS);
  },
  nodeCreated(node) {
    if (node.comfyClass !== NODE) return;
    node.properties ??= {};
    node.properties[OPEN] ??= true; // a new node shows its sliders
    const editor = new BlockEditor(node);
    node.zitBlockEditor = editor;
    const onConfigure = node.onConfigure;
    node.onConfigure = function (info, ...args) {
      // a workflow saved before the editor existed keeps its layout: the sliders start hidden there
      if (!(OPEN in (info?.properties ?? {}))) this.properties[OPEN] = false;
      const out = onConfigure?.call(this, info, ...args);
      editor.showOpen();
      return out;
    };
    const onRemoved = node.onRemoved;
    node.onRemoved = function (...args) {
      editor.remove();
      return onRemoved?.apply(this, args);
    };
    requestAnimationFrame(() => editor.fitNode()); // once the frontend has laid the widgets out (and configured)
  },
});
