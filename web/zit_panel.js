// zit-trainer: the "ZIT" sidebar tab. Lists training jobs with progress, ETA, it/s, a live loss chart (raw and
// EMA-smoothed, with the learning rate), preview images as they arrive, and stop / resume.
//
// State comes from the routes (GET /zit/jobs, GET /zit/jobs/<id>), so the panel survives a page reload; the
// server's events (zit.progress, zit.preview, zit.status, zit.log, zit.plan, zit.checkpoint, zit.cache) keep
// it live in between.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  addStyle,
  el,
  formatDuration,
  formatNumber,
  getJSON,
  onServerEvent,
  postJSON,
  routeURL,
} from "./zit_api.js";
import { HealthChart } from "./zit_health_chart.js";

const TAB_ID = "zit-trainer";
const FINISHED = new Set(["done", "stopped", "failed"]);
const LOG_LINES = 50;
const STORAGE = { selected: "zit.panel.selected", smoothing: "zit.panel.smoothing" };
const COLORS = { raw: "rgba(150, 185, 255, 0.5)", smooth: "#4f8cff", lr: "#f0a040", grid: "rgba(128,128,128,0.25)" };

// ------------------------------------------------------------------------------------------------------------
// The store: every job the server reports, with the series the detail route gave and the events added since.
// ------------------------------------------------------------------------------------------------------------

const store = {
  jobs: new Map(), // id -> {snap, loss: [[step, loss]], lr: [[step, lr]], previews, checkpoints, logs, loaded}
  order: [], // ids, newest first
  selected: localStorage.getItem(STORAGE.selected),
  error: null, // the job routes' failure, shown instead of the list
  loadedOnce: false,
};

function emptyJob(snap) {
  return { snap, loss: [], lr: [], health: [], previews: [], checkpoints: [], logs: [], loaded: false,
    shownPreview: null };
}

function upsertSnapshot(snap) {
  let job = store.jobs.get(snap.id);
  if (!job) {
    job = emptyJob(snap);
    store.jobs.set(snap.id, job);
  } else {
    job.snap = snap;
  }
  store.order = [...store.jobs.values()]
    .sort((a, b) => (b.snap.started ?? 0) - (a.snap.started ?? 0))
    .map((j) => j.snap.id);
  return job;
}

/** Points of `live` after the last step of `base` (events that arrived while the route answered). */
function mergeSeries(base, live) {
  const last = base.length ? base[base.length - 1][0] : -Infinity;
  return base.concat(live.filter((p) => p[0] > last));
}

function pushPoint(series, step, value) {
  if (!Number.isFinite(step) || value === null || value === undefined || !Number.isFinite(Number(value))) return;
  const last = series.length ? series[series.length - 1][0] : -Infinity;
  if (step > last) series.push([step, Number(value)]);
  else if (step === last) series[series.length - 1][1] = Number(value);
}

function previewName(url) {
  return decodeURIComponent(String(url || "").split("?")[0].split("/").pop() || "");
}

async function refreshJobs() {
  try {
    const body = await getJSON("/zit/jobs");
    store.error = null;
    const seen = new Set();
    let started = null; // a job that appeared since the last refresh and runs: the panel follows it
    for (const snap of body.jobs || []) {
      if (store.loadedOnce && !store.jobs.has(snap.id) && !FINISHED.has(snap.status)) started = snap.id;
      upsertSnapshot(snap);
      seen.add(snap.id);
    }
    if (started) store.selected = started;
    for (const id of [...store.jobs.keys()]) if (!seen.has(id)) store.jobs.delete(id);
    store.order = store.order.filter((id) => seen.has(id));
    if (!store.jobs.has(store.selected)) {
      const running = store.order.find((id) => !FINISHED.has(store.jobs.get(id).snap.status));
      store.selected = running ?? store.order[0] ?? null;
    }
  } catch (e) {
    store.error = e.message;
  }
  store.loadedOnce = true;
  update();
  if (store.selected) await loadDetail(store.selected);
}

async function loadDetail(id) {
  try {
    const body = await getJSON(`/zit/jobs/${encodeURIComponent(id)}`);
    const job = upsertSnapshot(body.job);
    job.loss = mergeSeries(body.loss || [], job.loss);
    job.lr = mergeSeries(body.lr || [], job.lr);
    job.health = mergeSeries(body.health || [], job.health);
    const names = new Set((body.previews || []).map((p) => p.name));
    job.previews = [...(body.previews || []), ...job.previews.filter((p) => !names.has(p.name))];
    job.checkpoints = body.checkpoints || [];
    job.loaded = true;
  } catch (e) {
    const job = store.jobs.get(id);
    if (job) job.detailError = e.message;
  }
  update();
}

let refreshTimer = null;
function scheduleRefresh(delay = 250) {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refreshJobs, delay);
}

const detailTimers = new Map();
function scheduleDetail(id, delay = 400) {
  clearTimeout(detailTimers.get(id));
  detailTimers.set(id, setTimeout(() => loadDetail(id), delay));
}

function onProgress(data) {
  const job = store.jobs.get(data.job);
  if (!job) return scheduleRefresh();
  job.snap.last = { ...(job.snap.last || {}), progress: data };
  if (FINISHED.has(job.snap.status)) scheduleRefresh();
  pushPoint(job.loss, Number(data.step), data.loss);
  pushPoint(job.lr, Number(data.step), data.lr);
  update();
}

function onPreview(data) {
  const job = store.jobs.get(data.job);
  if (!job) return scheduleRefresh();
  job.snap.last = { ...(job.snap.last || {}), preview: data };
  const name = data.name || previewName(data.url);
  if (!job.previews.some((p) => p.name === name)) job.previews.push({ step: data.step, name, url: data.url });
  job.shownPreview = null; // follow the newest
  update();
}

function onStatus(data) {
  const job = store.jobs.get(data.job);
  if (!job) return scheduleRefresh();
  job.snap.status = data.status;
  job.snap.error = data.error ?? job.snap.error;
  if (FINISHED.has(data.status)) {
    scheduleRefresh(); // finished time, resumable
    scheduleDetail(data.job);
  }
  update();
}

function onCheckpoint(data) {
  const job = store.jobs.get(data.job);
  if (!job) return scheduleRefresh();
  job.snap.last = { ...(job.snap.last || {}), checkpoint: data };
  scheduleDetail(data.job); // the checkpoint names for the resume menu
  update();
}

function onCache(data) {
  const job = store.jobs.get(data.job);
  if (!job) return scheduleRefresh();
  job.cache = data; // {stage: "latents" | "text", done, total}: encoding before the first step
  update();
}

function onHealth(data) {
  const job = store.jobs.get(data.job);
  if (!job) return scheduleRefresh();
  job.snap.last = { ...(job.snap.last || {}), health: data };
  pushPoint(job.health, Number(data.step), data.health);
  update();
}

function onPlan(data) {
  const job = store.jobs.get(data.job);
  if (!job) return scheduleRefresh();
  job.snap.last = { ...(job.snap.last || {}), plan: data };
  update();
}

function onLog(data) {
  const job = store.jobs.get(data.job);
  if (!job) return;
  job.logs.push(String(data.message ?? ""));
  if (job.logs.length > LOG_LINES) job.logs.splice(0, job.logs.length - LOG_LINES);
  update();
}

async function stopJob(id, button) {
  button.disabled = true;
  try {
    const body = await postJSON(`/zit/jobs/${encodeURIComponent(id)}/stop`);
    if (body.job) upsertSnapshot(body.job);
  } catch (e) {
    toast(`Stop failed: ${e.message}`);
  }
  update();
}

async function resumeJob(id, checkpoint, button) {
  button.disabled = true;
  try {
    const body = await postJSON(`/zit/jobs/${encodeURIComponent(id)}/resume`, checkpoint ? { checkpoint } : {});
    if (body.job) {
      upsertSnapshot(body.job);
      select(body.job.id);
    }
  } catch (e) {
    toast(`Resume failed: ${e.message}`);
    button.disabled = false;
  }
  update();
}

function toast(message) {
  const t = app.extensionManager?.toast;
  if (t?.add) t.add({ severity: "error", summary: "ZIT Trainer", detail: message, life: 6000 });
  else console.error("[zit-trainer]", message);
}

function select(id) {
  store.selected = id;
  localStorage.setItem(STORAGE.selected, id);
  const job = store.jobs.get(id);
  update();
  if (job) loadDetail(id);
}

// ------------------------------------------------------------------------------------------------------------
// The loss chart: raw loss (faint), its debiased EMA (bold), the learning rate (dashed, right axis).
// ------------------------------------------------------------------------------------------------------------

/** TensorBoard's smoothing: an EMA debiased for its zero start, so the first points are not pulled to 0. */
function smoothSeries(points, weight) {
  let last = 0;
  let count = 0;
  return points.map(([step, value]) => {
    count += 1;
    last = last * weight + (1 - weight) * value;
    const debias = weight > 0 ? 1 - weight ** count : 1;
    return [step, last / debias];
  });
}

function quantile(sorted, q) {
  if (!sorted.length) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.round(q * (sorted.length - 1))));
  return sorted[i];
}

function niceTicks(lo, hi, count) {
  const span = hi - lo || Math.abs(hi) || 1;
  const raw = span / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

function extent(points) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const [, v] of points) {
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  return [lo, hi];
}

/** At most ~4 points per pixel column (first, min, max, last), so a long run draws as fast as a short one. */
function decimate(points, X, width) {
  if (points.length <= width * 4) return points;
  const out = [];
  let column = null;
  let bucket = [];
  const flush = () => {
    if (!bucket.length) return;
    let lo = bucket[0];
    let hi = bucket[0];
    for (const p of bucket) {
      if (p[1] < lo[1]) lo = p;
      if (p[1] > hi[1]) hi = p;
    }
    const keep = [bucket[0], lo, hi, bucket[bucket.length - 1]].sort((a, b) => a[0] - b[0]);
    for (const p of keep) if (out[out.length - 1] !== p) out.push(p);
  };
  for (const p of points) {
    const c = Math.floor(X(p[0]));
    if (c !== column) {
      flush();
      column = c;
      bucket = [];
    }
    bucket.push(p);
  }
  flush();
  return out;
}

class LossChart {
  constructor() {
    this.canvas = el("canvas.zit-loss-chart", { "aria-label": "Training loss chart" });
    this.readout = el("div.zit-chart-readout", {}, "\u00a0");
    this.smoothing = Number(localStorage.getItem(STORAGE.smoothing) ?? 0.6);
    this.slider = el("input", {
      type: "range", min: "0", max: "0.99", step: "0.01", value: String(this.smoothing),
      title: "EMA smoothing of the loss (0 = raw)",
      oninput: () => {
        this.smoothing = Number(this.slider.value);
        this.smoothingLabel.textContent = this.smoothing.toFixed(2);
        localStorage.setItem(STORAGE.smoothing, String(this.smoothing));
        this.draw();
      },
    });
    this.smoothingLabel = el("span.zit-mono", {}, this.smoothing.toFixed(2));
    this.element = el("div.zit-chart",
      el("div.zit-chart-head",
        el("span.zit-legend", el("i", { style: { background: COLORS.smooth } }), "loss (smoothed)"),
        el("span.zit-legend", el("i", { style: { background: COLORS.raw } }), "raw"),
        el("span.zit-legend", el("i.zit-dash", { style: { borderColor: COLORS.lr } }), "lr"),
        el("label.zit-smoothing", "smoothing ", this.slider, this.smoothingLabel)),
      this.canvas, this.readout);
    this.job = null;
    this.layout = null;
    this.canvas.addEventListener("mousemove", (e) => this.hover(e));
    this.canvas.addEventListener("mouseleave", () => { this.hoverStep = null; this.draw(); });
    this.resize = new ResizeObserver(() => this.draw());
    this.resize.observe(this.canvas);
  }

  setJob(job) {
    this.job = job;
    this.canvas.dataset.jobId = job?.snap.id ?? "";
    this.draw();
  }

  hover(event) {
    if (!this.layout || !this.job?.loss.length) return;
    const rect = this.canvas.getBoundingClientRect();
    const step = this.layout.xInv(event.clientX - rect.left);
    this.hoverStep = step;
    this.draw();
  }

  draw() {
    const canvas = this.canvas;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    const dpr = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
      canvas.width = Math.round(width * dpr);
      canvas.height = Math.round(height * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const style = getComputedStyle(canvas);
    const fg = style.color || "#ccc";
    ctx.font = "10px sans-serif";

    const loss = (this.job?.loss || []).filter((p) => Number.isFinite(p[1]));
    const lr = (this.job?.lr || []).filter((p) => Number.isFinite(p[1]));
    canvas.dataset.points = String(loss.length);
    canvas.dataset.lastStep = loss.length ? String(loss[loss.length - 1][0]) : "";
    if (!loss.length) {
      this.layout = null;
      ctx.fillStyle = fg;
      ctx.globalAlpha = 0.6;
      ctx.textAlign = "center";
      ctx.fillText(this.job ? "waiting for the first loss value…" : "no job selected", width / 2, height / 2);
      ctx.globalAlpha = 1;
      this.readout.textContent = "\u00a0";
      return;
    }
    const smooth = smoothSeries(loss, this.smoothing);
    const x0 = Math.min(loss[0][0], 0); // the steps trained so far (the progress bar shows the rest)
    const x1 = Math.max(loss[loss.length - 1][0], x0 + 1);
    // the y range leaves out the top 1% of the raw loss, so one spike does not flatten the curve
    const sorted = loss.map((p) => p[1]).sort((a, b) => a - b);
    const [sLo, sHi] = extent(smooth);
    let y0 = Math.min(sorted[0], sLo);
    let y1 = Math.max(quantile(sorted, loss.length > 50 ? 0.99 : 1), sHi);
    if (y1 - y0 < 1e-12) {
      y0 -= Math.abs(y0) * 0.1 || 0.5;
      y1 += Math.abs(y1) * 0.1 || 0.5;
    }
    const pad = (y1 - y0) * 0.06;
    y0 -= pad;
    y1 += pad;
    const lrMax = lr.length ? extent(lr)[1] * 1.08 || 1 : 1;

    const left = 44;
    const right = lr.length ? 44 : 10;
    const top = 8;
    const bottom = 18;
    const plotW = Math.max(10, width - left - right);
    const plotH = Math.max(10, height - top - bottom);
    const X = (s) => left + ((s - x0) / (x1 - x0)) * plotW;
    const Y = (v) => top + (1 - (v - y0) / (y1 - y0)) * plotH;
    const YL = (v) => top + (1 - v / lrMax) * plotH;
    this.layout = { xInv: (px) => x0 + ((px - left) / plotW) * (x1 - x0) };

    // grid and axes
    ctx.strokeStyle = COLORS.grid;
    ctx.lineWidth = 1;
    ctx.fillStyle = fg;
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    for (const t of niceTicks(y0, y1, 4)) {
      if (t < y0 || t > y1) continue;
      const y = Math.round(Y(t)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(left, y);
      ctx.lineTo(left + plotW, y);
      ctx.stroke();
      ctx.fillText(formatNumber(t, 3), left - 4, y);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (const t of niceTicks(x0, x1, 5)) {
      if (t < x0 || t > x1) continue;
      ctx.fillText(String(t), X(t), top + plotH + 4);
    }
    if (lr.length) {
      ctx.textAlign = "left";
      ctx.textBaseline = "middle";
      ctx.fillStyle = COLORS.lr;
      for (const t of niceTicks(0, lrMax, 3)) {
        if (t > lrMax) continue;
        ctx.fillText(formatNumber(t, 2), left + plotW + 4, YL(t));
      }
    }
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top, plotW, plotH);
    ctx.clip();
    const line = (all, map, color, widthPx, dash) => {
      const points = decimate(all, X, plotW);
      ctx.strokeStyle = color;
      ctx.lineWidth = widthPx;
      ctx.setLineDash(dash || []);
      ctx.beginPath();
      points.forEach(([s, v], i) => (i ? ctx.lineTo(X(s), map(v)) : ctx.moveTo(X(s), map(v))));
      if (points.length === 1) ctx.arc(X(points[0][0]), map(points[0][1]), widthPx, 0, 2 * Math.PI);
      ctx.stroke();
      ctx.setLineDash([]);
    };
    if (lr.length) line(lr, YL, COLORS.lr, 1.2, [4, 3]);
    line(loss, Y, COLORS.raw, 1);
    line(smooth, Y, COLORS.smooth, 2);
    ctx.restore();

    // hover readout (else the latest values)
    let i = loss.length - 1;
    if (this.hoverStep !== null && this.hoverStep !== undefined) {
      let best = Infinity;
      loss.forEach(([s], k) => {
        const d = Math.abs(s - this.hoverStep);
        if (d < best) { best = d; i = k; }
      });
      const x = Math.round(X(loss[i][0])) + 0.5;
      ctx.strokeStyle = fg;
      ctx.globalAlpha = 0.4;
      ctx.beginPath();
      ctx.moveTo(x, top);
      ctx.lineTo(x, top + plotH);
      ctx.stroke();
      ctx.globalAlpha = 1;
    }
    const [step, value] = loss[i];
    const lrAt = lr.find((p) => p[0] === step)?.[1];
    this.readout.textContent = `step ${step} · loss ${formatNumber(value)} · smoothed ${formatNumber(smooth[i][1])}` +
      (lrAt !== undefined ? ` · lr ${formatNumber(lrAt, 3)}` : "");
  }

  dispose() {
    this.resize.disconnect();
  }
}

// ------------------------------------------------------------------------------------------------------------
// The view: built into the sidebar tab's element while it is open; the store outlives it. Elements are kept
// and updated in place (a click is never lost to a re-render); a part is rebuilt only when its key changes.
// ------------------------------------------------------------------------------------------------------------

let view = null;
let frame = 0;

function update() {
  if (!view || frame) return;
  frame = requestAnimationFrame(() => {
    frame = 0;
    if (view) renderView(view);
  });
}

/** Replace `slot`'s content by build() when key differs from the last one built there. */
function keyed(slot, key, build) {
  if (slot._zitKey === key) return;
  slot._zitKey = key;
  slot.replaceChildren(build());
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function setBadge(node, status) {
  setText(node, status);
  node.className = `zit-badge zit-${status}`;
}

function progressLine(snap) {
  const p = snap.last?.progress || {};
  const parts = [p.steps ? `${p.step ?? 0}/${p.steps}` : snap.status === "running" ? "starting" : "–"];
  const cache = store.jobs.get(snap.id)?.cache;
  if (!p.steps && cache && snap.status === "running") parts[0] = `caching ${cache.stage} ${cache.done}/${cache.total}`;
  if (p.it_s) parts.push(`${formatNumber(p.it_s, 3)} it/s`);
  if (!FINISHED.has(snap.status) && Number.isFinite(Number(p.eta_s)) && p.eta_s !== null) {
    parts.push(`ETA ${formatDuration(p.eta_s)}`);
  }
  if (Number.isFinite(Number(p.loss)) && p.loss !== null) parts.push(`loss ${formatNumber(p.loss)}`);
  return parts.join(" · ");
}

function jobStats(snap) {
  const p = snap.last?.progress || {};
  const finished = FINISHED.has(snap.status);
  return [
    ["step", p.steps ? `${p.step ?? 0} / ${p.steps}` : String(p.step ?? "–")],
    ["loss", formatNumber(p.loss)],
    ["lr", formatNumber(p.lr, 3)],
    ["it/s", formatNumber(p.it_s, 3)],
    [finished ? "took" : "ETA", finished && snap.finished
      ? formatDuration(snap.finished - (snap.started ?? snap.finished))
      : formatDuration(p.eta_s)],
    ["mem", p.mem_gb ? `${formatNumber(p.mem_gb, 3)} GB` : "–"], // 0 on the CPU: nothing measured
    ["plan", planText(snap.last?.plan)],
    ["turbo health", healthText(snap.last?.health)],
  ];
}

function healthText(h) {
  if (!Number.isFinite(Number(h?.health)) || h?.health === null) return "–";
  const distill = h.scale?.includes("teacher");
  const advice = distill ? "distillation is not helping: stop, or lower the learning rate"
    : "degrading: stop, or use the DistillPatch / distill mode";
  const warn = h.health > h.threshold ? ` ⚠ ${advice}` : "";
  return `${formatNumber(h.health, 3)} at step ${h.step} (${h.scale || "1 = base"})${warn}`;
}

function planText(plan) {
  if (!plan?.plan) return "–";
  const budget = plan.budget_gb ? ` of ${formatNumber(plan.budget_gb, 3)}` : "";
  return `${plan.plan} · ${formatNumber(plan.predicted_gb, 3)}${budget} GiB predicted`;
}

function buildRow(id) {
  const name = el("span.zit-job-name");
  const badge = el("span.zit-badge");
  const fill = el("div.zit-progress-fill");
  const bar = el("div.zit-progress", {}, fill);
  const line = el("div.zit-job-line.zit-mono");
  const root = el("div.zit-job", {
    role: "button", tabindex: "0", dataset: { jobId: id },
    onclick: () => select(id),
    onkeydown: (e) => { if (e.key === "Enter") select(id); },
  }, el("div.zit-job-head", name, badge), bar, line);
  return { root, name, badge, fill, bar, line };
}

function updateRow(row, job) {
  const snap = job.snap;
  const p = snap.last?.progress || {};
  const fraction = p.steps ? Math.min(1, (p.step ?? 0) / p.steps) : snap.status === "done" ? 1 : 0;
  setText(row.name, snap.name || snap.id);
  row.name.title = snap.lora_name ? `${snap.id} → ${snap.lora_name}` : snap.id;
  setBadge(row.badge, snap.status);
  row.fill.style.width = `${(fraction * 100).toFixed(1)}%`;
  row.bar.title = `${Math.round(fraction * 100)} %`;
  setText(row.line, progressLine(snap));
  Object.assign(row.root.dataset, { status: snap.status, step: String(p.step ?? ""), steps: String(p.steps ?? "") });
  row.root.classList.toggle("zit-selected", snap.id === store.selected);
}

function buildActions(job) {
  const snap = job.snap;
  const actions = el("div.zit-actions");
  if (snap.status === "running") {
    const stop = el("button.zit-button.zit-stop", { title: "Stop after the current step (saves a checkpoint)" }, "Stop");
    stop.addEventListener("click", () => stopJob(snap.id, stop));
    actions.append(stop);
  } else if (snap.status === "stopping") {
    actions.append(el("span.zit-muted", {}, "stopping: saving a checkpoint…"));
  }
  if (FINISHED.has(snap.status) && snap.resumable) {
    const pick = el("select.zit-select", { title: "Checkpoint to resume from" },
      el("option", { value: "" }, "latest checkpoint"),
      [...job.checkpoints].reverse().map((name) => el("option", { value: name }, name)));
    const resume = el("button.zit-button.zit-resume", { title: "Continue training from the checkpoint (a new job)" },
      "Resume");
    resume.addEventListener("click", () => resumeJob(snap.id, pick.value || null, resume));
    actions.append(resume, job.checkpoints.length > 1 ? pick : "");
  }
  return actions;
}

function sortedPreviews(job) {
  return [...job.previews].sort((a, b) => (a.step ?? 0) - (b.step ?? 0));
}

function buildPreviews(job) {
  const previews = sortedPreviews(job);
  if (!previews.length) return el("div.zit-muted.zit-previews-empty", {}, "No preview images yet.");
  const shown = previews.find((p) => p.name === job.shownPreview) || previews[previews.length - 1];
  const prompts = job.snap.last?.preview?.prompts;
  return el("div.zit-previews",
    el("a", { href: routeURL(shown.url), target: "_blank", title: "Open full size" },
      el("img.zit-preview-main", { src: routeURL(shown.url), alt: `preview at step ${shown.step}` })),
    el("div.zit-muted", {}, `step ${shown.step}`,
      Array.isArray(prompts) && prompts.length ? ` · ${prompts.join(" | ")}` : ""),
    el("div.zit-thumbs", previews.slice().reverse().map((p) => el(`img.zit-thumb${p === shown ? ".zit-selected" : ""}`, {
      src: routeURL(p.url), alt: `step ${p.step}`, title: `step ${p.step}`, loading: "lazy",
      onclick: () => { job.shownPreview = p.name; update(); },
    }))));
}

function buildDetail(chart, healthChart) {
  const d = {
    name: el("b"), badge: el("span.zit-badge"), lora: el("div.zit-muted"), error: el("div.zit-error"),
    stats: el("div.zit-stats"), actions: el("div"), log: el("div.zit-log.zit-mono"), previews: el("div"),
  };
  d.root = el("div.zit-detail", {}, el("div.zit-detail-head", d.name, d.badge), d.lora, d.error, d.stats,
    d.actions, chart.element, healthChart.element, d.log, el("div.zit-section", {}, "Previews"), d.previews);
  return d;
}

function updateDetail(d, job, chart, healthChart) {
  const snap = job.snap;
  d.root.dataset.jobId = snap.id;
  setText(d.name, snap.name || snap.id);
  setBadge(d.badge, snap.status);
  setText(d.lora, snap.lora_name ? `LoRA: ${snap.lora_name}` : "");
  setText(d.error, [snap.error, job.detailError].filter(Boolean).join("\n"));
  d.stats.replaceChildren(...jobStats(snap).map(([k, v]) =>
    el("div.zit-stat", el("span.zit-muted", {}, k), el("span.zit-mono", {}, v))));
  keyed(d.actions, `${snap.id}|${snap.status}|${snap.resumable}|${job.checkpoints.join(",")}`,
    () => buildActions(job));
  const lastLog = job.logs[job.logs.length - 1] ?? "";
  setText(d.log, lastLog);
  d.log.title = job.logs.join("\n");
  const previews = sortedPreviews(job);
  keyed(d.previews, `${snap.id}|${previews.map((p) => p.name).join(",")}|${job.shownPreview}`,
    () => buildPreviews(job));
  chart.setJob(job);
  healthChart.setJob(job);
}

function renderView(v) {
  let message = "";
  if (store.error) message = `The job routes did not answer: ${store.error}`;
  else if (!store.loadedOnce) message = "Loading jobs…";
  else if (!store.order.length) {
    message = "No training jobs yet. Run a ZIT training node: its progress, loss and previews appear here.";
  }
  setText(v.message, message);
  v.message.className = store.error ? "zit-error" : "zit-muted";
  for (const id of [...v.rows.keys()]) {
    if (!store.jobs.has(id)) {
      v.rows.get(id).root.remove();
      v.rows.delete(id);
    }
  }
  store.order.forEach((id, i) => {
    let row = v.rows.get(id);
    if (!row) {
      row = buildRow(id);
      v.rows.set(id, row);
    }
    updateRow(row, store.jobs.get(id));
    if (v.list.children[i] !== row.root) v.list.insertBefore(row.root, v.list.children[i] ?? null);
  });
  const job = store.jobs.get(store.selected);
  v.detail.root.style.display = job ? "" : "none";
  if (job) updateDetail(v.detail, job, v.chart, v.healthChart);
}

function mountPanel(container) {
  const chart = new LossChart();
  const healthChart = new HealthChart();
  const refresh = el("button.zit-button", { title: "Reload the jobs from the server", onclick: () => refreshJobs() },
    "Refresh");
  const message = el("div.zit-muted");
  const list = el("div.zit-jobs");
  const detail = buildDetail(chart, healthChart);
  container.replaceChildren(el("div.zit-panel",
    el("div.zit-panel-head", el("b", {}, "ZIT Trainer"), refresh), message, list, detail.root));
  view = { message, list, rows: new Map(), detail, chart, healthChart };
  renderView(view);
  refreshJobs();
}

function unmountPanel() {
  if (view) {
    view.chart.dispose();
    view.healthChart.dispose();
  }
  view = null;
}

const CSS = `
.zit-panel { display: flex; flex-direction: column; gap: 8px; padding: 8px; font-size: 12px;
  color: var(--fg-color, #ddd); height: 100%; overflow-y: auto; box-sizing: border-box; }
.zit-panel-head, .zit-job-head, .zit-detail-head { display: flex; align-items: center; justify-content: space-between;
  gap: 6px; }
.zit-panel-head b { font-size: 14px; }
.zit-jobs { display: flex; flex-direction: column; gap: 4px; }
.zit-job { border: 1px solid var(--border-color, #444); border-radius: 6px; padding: 6px; cursor: pointer;
  background: var(--comfy-input-bg, rgba(128,128,128,0.08)); }
.zit-job.zit-selected { outline: 2px solid #4f8cff; }
.zit-job-name { font-weight: 600; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.zit-job-line { margin-top: 3px; opacity: 0.85; }
.zit-progress { height: 4px; border-radius: 2px; background: rgba(128,128,128,0.3); margin-top: 4px; overflow: hidden; }
.zit-progress-fill { height: 100%; background: #4f8cff; transition: width 0.3s; }
.zit-badge { font-size: 10px; padding: 1px 6px; border-radius: 8px; background: rgba(128,128,128,0.3); }
.zit-badge.zit-running { background: #2e7d32; color: #fff; }
.zit-badge.zit-stopping { background: #b26a00; color: #fff; }
.zit-badge.zit-failed { background: #c62828; color: #fff; }
.zit-badge.zit-done { background: #1565c0; color: #fff; }
.zit-detail .zit-muted, .zit-error { overflow-wrap: anywhere; }
.zit-detail { display: flex; flex-direction: column; gap: 6px; border-top: 1px solid var(--border-color, #444);
  padding-top: 8px; }
.zit-stats { display: grid; grid-template-columns: repeat(3, 1fr); gap: 4px; }
.zit-stat { display: flex; flex-direction: column; padding: 3px 5px; border-radius: 4px;
  background: var(--comfy-input-bg, rgba(128,128,128,0.08)); }
.zit-stat .zit-mono { font-size: 13px; }
.zit-mono { font-family: ui-monospace, monospace; }
.zit-muted { opacity: 0.65; }
.zit-error { color: #ff6b6b; white-space: pre-wrap; }
.zit-actions { display: flex; gap: 6px; align-items: center; flex-wrap: wrap; }
.zit-button { font-size: 12px; padding: 3px 10px; border-radius: 4px; cursor: pointer;
  border: 1px solid var(--border-color, #555); background: var(--comfy-input-bg, #333); color: inherit; }
.zit-button:disabled { opacity: 0.5; cursor: default; }
.zit-stop { border-color: #c62828; }
.zit-resume { border-color: #2e7d32; }
.zit-select { font-size: 12px; background: var(--comfy-input-bg, #333); color: inherit;
  border: 1px solid var(--border-color, #555); border-radius: 4px; }
.zit-chart { display: flex; flex-direction: column; gap: 2px; }
.zit-chart-head { display: flex; gap: 10px; align-items: center; flex-wrap: wrap; font-size: 11px; }
.zit-legend i { display: inline-block; width: 12px; height: 3px; margin-right: 4px; vertical-align: middle; }
.zit-legend i.zit-dash { height: 0; border-top: 2px dashed; background: none; }
.zit-smoothing { margin-left: auto; display: flex; align-items: center; gap: 4px; }
.zit-smoothing input { width: 80px; }
.zit-health-chart { width: 100%; height: 90px; display: block; color: var(--fg-color, #ccc); }
.zit-loss-chart { width: 100%; height: 180px; display: block; color: var(--fg-color, #ccc);
  background: var(--comfy-input-bg, rgba(128,128,128,0.06)); border-radius: 4px; cursor: crosshair; }
.zit-chart-readout { font-size: 11px; opacity: 0.8; font-family: ui-monospace, monospace; }
.zit-log { font-size: 11px; opacity: 0.75; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.zit-section { font-weight: 600; margin-top: 4px; }
.zit-previews { display: flex; flex-direction: column; gap: 4px; }
.zit-preview-main { width: 100%; max-height: 260px; object-fit: contain; border-radius: 4px; display: block; }
.zit-thumbs { display: flex; gap: 4px; overflow-x: auto; }
.zit-thumb { height: 48px; border-radius: 3px; cursor: pointer; opacity: 0.7; }
.zit-thumb.zit-selected, .zit-thumb:hover { opacity: 1; outline: 2px solid #4f8cff; }
`;

// listen from the module's start: the socket may already deliver events before the extension's setup
onServerEvent("zit.progress", onProgress);
onServerEvent("zit.preview", onPreview);
onServerEvent("zit.status", onStatus);
onServerEvent("zit.checkpoint", onCheckpoint);
onServerEvent("zit.log", onLog);
onServerEvent("zit.plan", onPlan);
onServerEvent("zit.health", onHealth);
onServerEvent("zit.cache", onCache);
api.addEventListener("reconnected", () => refreshJobs()); // events sent while disconnected are lost

app.registerExtension({
  name: "zit.trainer.panel",
  async setup() {
    addStyle("zit-panel-style", CSS);
    app.extensionManager.registerSidebarTab({
      id: TAB_ID,
      icon: "pi pi-chart-line",
      title: "ZIT",
      label: "ZIT",
      tooltip: "ZIT Trainer: training jobs, loss, previews",
      type: "custom",
      render: (element) => mountPanel(element),
      destroy: () => unmountPanel(),
    });
    refreshJobs();
  },
});
