// zit-trainer: the ZIT panel's second chart, turbo health per measurement, with its warning threshold.
// Health is measured every preview.health_every steps: in sft / adapter modes the 8-step x0 drift relative to
// the untouched base (1 = as turbo as the base, higher = worse); in distill mode the 8-step sample's distance
// to the teacher relative to the SFT LoRA alone (lower = better). Above the red line the trainer warns.
import { el, formatNumber } from "./zit_api.js";

const COLORS = { health: "#3fb070", warn: "#e05050", grid: "rgba(128,128,128,0.25)" };

export class HealthChart {
  constructor() {
    this.title = el("div.zit-chart-head", {}, "turbo health");
    this.canvas = el("canvas.zit-health-chart", { "aria-label": "Turbo health chart" });
    this.element = el("div.zit-chart", {}, this.title, this.canvas);
    this.job = null;
    this.resize = new ResizeObserver(() => this.draw());
    this.resize.observe(this.canvas);
  }

  setJob(job) {
    this.job = job;
    this.canvas.dataset.jobId = job?.snap.id ?? "";
    this.element.style.display = job?.health?.length ? "" : "none";
    this.draw();
  }

  draw() {
    const points = (this.job?.health || []).filter((p) => Number.isFinite(p[1]));
    const last = this.job?.snap.last?.health || {};
    const threshold = Number(last.threshold);
    this.canvas.dataset.points = String(points.length);
    this.title.textContent = `turbo health${last.scale ? ` (${last.scale})` : ""}` +
      (Number.isFinite(threshold) ? `; warning above ${formatNumber(threshold, 3)}` : "");
    const canvas = this.canvas;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height || !points.length) return;
    const dpr = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const fg = getComputedStyle(canvas).color || "#ccc";
    ctx.font = "10px sans-serif";
    const values = points.map((p) => p[1]).concat([1], Number.isFinite(threshold) ? [threshold] : []);
    let y0 = Math.min(...values);
    let y1 = Math.max(...values);
    const pad = (y1 - y0) * 0.1 || 0.5;
    y0 -= pad;
    y1 += pad;
    const x1 = Math.max(this.job.snap.last?.progress?.steps || 0, points[points.length - 1][0], 1);
    const left = 44;
    const top = 6;
    const plotW = Math.max(10, width - left - 10);
    const plotH = Math.max(10, height - top - 16);
    const X = (s) => left + (s / x1) * plotW;
    const Y = (v) => top + (1 - (v - y0) / (y1 - y0)) * plotH;
    ctx.fillStyle = fg;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const v of [y0 + pad, y1 - pad]) ctx.fillText(formatNumber(v, 3), left - 4, Y(v));
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    ctx.fillText("0", X(0), top + plotH + 3);
    ctx.fillText(String(x1), X(x1) - 10, top + plotH + 3);
    ctx.strokeStyle = COLORS.grid;
    ctx.strokeRect(left, top, plotW, plotH);
    if (Number.isFinite(threshold)) {
      ctx.strokeStyle = COLORS.warn;
      ctx.setLineDash([4, 3]);
      ctx.beginPath();
      ctx.moveTo(left, Y(threshold));
      ctx.lineTo(left + plotW, Y(threshold));
      ctx.stroke();
      ctx.setLineDash([]);
    }
    ctx.strokeStyle = COLORS.health;
    ctx.fillStyle = COLORS.health;
    ctx.lineWidth = 2;
    ctx.beginPath();
    points.forEach(([s, v], i) => (i ? ctx.lineTo(X(s), Y(v)) : ctx.moveTo(X(s), Y(v))));
    ctx.stroke();
    for (const [s, v] of points) {
      ctx.fillStyle = Number.isFinite(threshold) && v > threshold ? COLORS.warn : COLORS.health;
      ctx.beginPath();
      ctx.arc(X(s), Y(v), 3, 0, 2 * Math.PI);
      ctx.fill();
    }
  }

  dispose() {
    this.resize.disconnect();
  }
}
