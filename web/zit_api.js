// zit-trainer: the small helpers the panel and the block editor share (JSON routes, formatting, styles).
// Every route is relative to the ComfyUI origin; api.fetchApi prefixes /api (ComfyUI mirrors custom routes).
import { api } from "../../scripts/api.js";

export class ZitRouteError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

async function request(path, options) {
  let response;
  try {
    response = await api.fetchApi(path, options);
  } catch (e) {
    throw new ZitRouteError(`${path}: the server did not answer (${e.message || e})`, 0);
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    const message = body && typeof body.error === "string" ? body.error : `${path}: HTTP ${response.status}`;
    throw new ZitRouteError(message, response.status);
  }
  if (body === null) throw new ZitRouteError(`${path}: the answer is not JSON`, response.status);
  return body;
}

/** GET a JSON route; throws ZitRouteError carrying the server's {"error"} message. */
export function getJSON(path) {
  return request(path, { method: "GET" });
}

/** POST a JSON body to a route; throws ZitRouteError carrying the server's {"error"} message. */
export function postJSON(path, body = {}) {
  return request(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
}

/** The browser URL of a server path such as /zit/jobs/<id>/previews/<name> (through the /api mirror). */
export function routeURL(path) {
  if (!path) return "";
  if (/^(https?:|data:|blob:)/.test(path)) return path;
  return api.apiURL(path.startsWith("/") ? path : `/${path}`);
}

/** Listen to a server event (send_sync) by name; returns a function that removes the listener. */
export function onServerEvent(name, handler) {
  const listener = (event) => handler(event.detail ?? {});
  api.addEventListener(name, listener);
  return () => api.removeEventListener(name, listener);
}

export function formatNumber(x, digits = 4) {
  if (x === null || x === undefined || !Number.isFinite(Number(x))) return "–";
  const v = Number(x);
  if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e5)) return v.toExponential(2);
  return String(Number(v.toPrecision(digits)));
}

export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(Number(seconds))) return "–";
  let s = Math.max(0, Math.round(Number(seconds)));
  const h = Math.floor(s / 3600);
  s -= h * 3600;
  const m = Math.floor(s / 60);
  s -= m * 60;
  if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m) return `${m}m ${String(s).padStart(2, "0")}s`;
  return `${s}s`;
}

/** Create an element: el("div.a.b", {title: "x", onclick: f}, child, "text", ...); attributes may be left out. */
export function el(tag, attrs = {}, ...children) {
  if (attrs instanceof Node || typeof attrs !== "object" || Array.isArray(attrs)) {
    children.unshift(attrs);
    attrs = {};
  }
  const [name, ...classes] = tag.split(".");
  const node = document.createElement(name || "div");
  if (classes.length) node.className = classes.join(" ");
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "style" && typeof value === "object") Object.assign(node.style, value);
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Add a <style> block once per id. */
export function addStyle(id, css) {
  if (document.getElementById(id)) return;
  document.head.append(el("style", { id }, css));
}
