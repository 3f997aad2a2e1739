// dco.train_monitor: a live training monitor on every DCO Trainer node.
//
// A DOM widget (not serialised, so widgets_values stay aligned with the Python inputs) shows
// the set-up phase with its progress, then step / total, it/s and ETA, a loss chart (loss,
// err_model, err_ref), a prior-drift / fit chart, the latest validation preview and what the
// previews cost, and after the run the images that fit worst and the dataset's warnings; all fed by
// the trainer's `dco.train` websocket events. The data lives in a store keyed by node id, outside
// the widget, so it survives collapse, zoom, redraws and a switch of node renderer (classic canvas
// or Nodes 2.0), and several trainers in one graph each keep their own run. Validation previews
// travel through the node's progress bar; ComfyUI would also draw each one under the node, so the
// monitor takes them out of ComfyUI's preview list: each shows once, in the monitor. After the run
// the node shows the final curve image that it returns (ui.PreviewImage): the fallback for
// renderers without DOM widgets.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { TRAIN_EVENT, TRAINER_NODE, chainMethod } from "./dco_shared.js";
import {
  MonitorStore, formatValue, perImageLines, phaseFraction, phaseLine, previewCostLine, statusLine, takeStockPreview,
} from "./dco_monitor_data.js";
import { COLORS, drawChart } from "./dco_chart.js";

export const store = new MonitorStore();
const views = new Set();
const MIN_HEIGHT = 250;
const WARN = "#e9b96e";
const NOTE_LINE = 14; // px per line of the notes (11px font)
const MAX_NOTE_LINES = 8; // more scroll

class MonitorView {
  constructor(node) {
    this.node = node;
    this.drawn = { loss: 0, monitor: 0, frames: 0 };
    this.pending = false;
    this.root = document.createElement("div");
    this.root.className = "dco-monitor";
    Object.assign(this.root.style, {
      display: "flex", flexDirection: "column", gap: "3px", boxSizing: "border-box", width: "100%",
      height: "100%", overflow: "hidden", font: "11px sans-serif", color: "#ddd", padding: "2px 0",
    });
    this.header = document.createElement("div");
    Object.assign(this.header.style, { whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis", flex: "0 0 auto" });
    this.bar = document.createElement("div"); // the set-up phase's progress
    Object.assign(this.bar.style, { flex: "0 0 3px", background: "rgba(255,255,255,0.12)", display: "none" });
    this.barFill = document.createElement("div");
    Object.assign(this.barFill.style, { height: "100%", width: "0%", background: "rgb(31,119,180)" });
    this.bar.append(this.barFill);
    this.values = document.createElement("div");
    Object.assign(this.values.style, { whiteSpace: "nowrap", overflow: "hidden", color: "#aaa", flex: "0 0 auto" });
    this.cost = document.createElement("div"); // what the validation previews cost
    Object.assign(this.cost.style, { whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis", color: "#aaa", flex: "0 0 auto" });
    this.notes = document.createElement("div"); // after the run: warnings, worst-fitting images
    Object.assign(this.notes.style, {
      flex: "0 1 auto", minHeight: "2.6em", maxHeight: `${NOTE_LINE * MAX_NOTE_LINES}px`, overflow: "auto", display: "none",
      lineHeight: `${NOTE_LINE}px`,
    });
    this.lossCanvas = document.createElement("canvas");
    Object.assign(this.lossCanvas.style, { flex: "3 1 0", minHeight: "0", width: "100%" });
    const row = document.createElement("div");
    Object.assign(row.style, { display: "flex", gap: "3px", flex: "2 1 0", minHeight: "0" });
    this.monitorCanvas = document.createElement("canvas");
    Object.assign(this.monitorCanvas.style, { flex: "1 1 0", minWidth: "0", height: "100%" });
    this.preview = document.createElement("img");
    this.preview.alt = "latest validation preview";
    Object.assign(this.preview.style, { height: "100%", aspectRatio: "1", objectFit: "contain", display: "none", background: "#111" });
    row.append(this.monitorCanvas, this.preview);
    this.root.append(this.header, this.bar, this.values, this.cost, this.lossCanvas, row, this.notes);
    this.resize = new ResizeObserver(() => this.schedule());
    this.resize.observe(this.root);
    views.add(this);
    this.draw();
  }

  get run() {
    return store.get(this.node.id);
  }

  /** What the page test reads: the data and what was last drawn. */
  stats() {
    const run = this.run;
    return {
      run: run?.id ?? null, status: run?.status ?? null, step: run?.step ?? 0, total: run?.total ?? 0,
      points: run?.loss.length ?? 0, monitorPoints: run?.monitor.length ?? 0, preview: !!run?.preview,
      finalImage: run?.finalImage ?? null, drawn: { ...this.drawn }, header: this.header.textContent,
      phase: run?.phase ?? null, bar: this.bar.style.display === "none" ? null : this.barFill.style.width,
      cost: this.cost.textContent, notes: this.notes.textContent, previews: run?.previews.length ?? 0,
      notesFit: this.notes.scrollHeight <= this.notes.clientHeight + 1, // every note line shows, unscrolled
      visible: this.root.isConnected && this.root.offsetParent !== null,
    };
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  canvasContext(canvas) {
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    if (!w || !h) return null; // collapsed or hidden: drawn again when it is shown (ResizeObserver)
    const dpr = window.devicePixelRatio || 1;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    return [ctx, w, h];
  }

  draw() {
    const run = this.run;
    this.header.textContent = statusLine(run);
    this.header.style.color = run?.status === "error" ? "#f88" : "#ddd";
    this.header.title = run?.message ?? "";
    const last = run?.loss.last();
    this.values.textContent = last
      ? `loss ${formatValue(last.loss)} · err_model ${formatValue(last.err_model)} · err_ref ${formatValue(last.err_ref)}` +
        (run.lr === null ? "" : ` · lr ${formatValue(run.lr)}`)
      : "\u00a0";
    this.cost.textContent = previewCostLine(run);
    this.cost.style.display = this.cost.textContent ? "" : "none";
    const fraction = phaseFraction(run?.phase);
    this.bar.style.display = fraction === null ? "none" : "";
    this.barFill.style.width = `${Math.round((fraction ?? 0) * 100)}%`;
    this.drawNotes(run);
    // The classic canvas gives the widget its height (getMinHeight); Nodes 2.0 lays the node out from
    // its content, where height: 100% would leave the charts no room.
    this.root.style.minHeight = globalThis.LiteGraph?.vueNodesMode ? `${this.minHeight()}px` : "";
    const first = run?.loss.at(0)?.step ?? 0;
    const xDomain = run ? [Math.min(first, run.total || first), Math.max(run.total, run.step)] : null;
    const lossCtx = this.canvasContext(this.lossCanvas);
    if (lossCtx) {
      const series = ["loss", "err_model", "err_ref"].map((name) => {
        const [xs, ys] = run ? run.series(name) : [[], []];
        return { name, color: COLORS[name], axis: name === "loss" ? "left" : "right", clip: name === "loss", xs, ys };
      });
      this.drawn.loss = drawChart(...lossCtx, series, { xDomain, empty: !run ? "not trained yet" : run.phase ? `${phaseLine(run.phase)}…` : "waiting for the first step" });
    }
    const monCtx = this.canvasContext(this.monitorCanvas);
    if (monCtx) {
      const series = ["drift", "fit"].map((name) => {
        const [xs, ys] = run ? run.series(name) : [[], []];
        return { name, color: COLORS[name], axis: name === "drift" ? "left" : "right", xs, ys };
      });
      this.drawn.monitor = drawChart(...monCtx, series, { xDomain, empty: "drift meter: no reading yet" });
    }
    const src = run?.preview ?? null;
    if (src) {
      if (this.preview.src !== src) this.preview.src = src;
      this.preview.style.display = "";
    } else {
      this.preview.style.display = "none";
    }
    this.drawn.frames += 1;
  }

  /** The height the monitor asks for: the charts, plus room for the notes after a run. */
  minHeight() {
    return MIN_HEIGHT + NOTE_LINE * Math.min(this.notes.childElementCount, MAX_NOTE_LINES);
  }

  drawNotes(run) {
    const warnings = run?.warnings ?? [];
    const worst = perImageLines(run);
    const signature = JSON.stringify([warnings, worst]);
    if (signature === this.notesSignature) return;
    this.notesSignature = signature;
    this.notes.replaceChildren();
    const line = (text, color) => {
      const div = document.createElement("div");
      Object.assign(div.style, { color, whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis" });
      div.textContent = text;
      div.title = text;
      this.notes.append(div);
    };
    for (const w of warnings) line(`⚠ ${w}`, WARN);
    if (worst.length) line("worst fit (final error per training image):", "#bbb");
    for (const text of worst) line(`  ${text}`, "#aaa");
    this.notes.style.display = this.notes.childElementCount ? "" : "none";
    if (this.node.graph) this.node.setDirtyCanvas?.(true, true); // the classic canvas grows the node to minHeight()
  }

  dispose() {
    this.resize.disconnect();
    views.delete(this);
  }
}

function redraw(nodeId) {
  for (const view of views) if (String(view.node.id) === String(nodeId)) view.schedule();
}

function trainerNode(nodeId) {
  for (const view of views) if (String(view.node.id) === String(nodeId)) return view.node;
  return null;
}

/** The key of `node` in app.nodePreviewImages (ComfyUI's "node locator": graph id + node id in a subgraph). */
function previewKey(node) {
  return node.graph && node.graph.isRootGraph === false ? `${node.graph.id}:${node.id}` : String(node.id);
}

/**
 * Take the preview ComfyUI just stored for `node` out of its list, so that the classic canvas and
 * Nodes 2.0 do not draw it under the node as well (the monitor shows it). ComfyUI's own listener ran
 * first (it is registered before any extension), in the same task, so nothing has drawn it yet. The
 * URL itself is revoked only with the next preview: ComfyUI's queue panel may still show it.
 */
let stockUrls = [];
function dropStockPreview(node) {
  const taken = takeStockPreview(app.nodePreviewImages, previewKey(node));
  if (!taken.length) return;
  for (const url of stockUrls) URL.revokeObjectURL(url);
  stockUrls = taken;
}

function setPreview(nodeId, blob) {
  const node = trainerNode(nodeId);
  if (!node || !store.get(nodeId)) return;
  const old = store.setPreview(nodeId, URL.createObjectURL(blob));
  if (old) URL.revokeObjectURL(old);
  dropStockPreview(node);
  redraw(nodeId);
}

app.registerExtension({
  name: "dco.train_monitor",

  setup() {
    api.addEventListener(TRAIN_EVENT, ({ detail }) => {
      const run = store.apply(detail);
      if (run) redraw(run.node);
    });
    // Validation previews travel as ComfyUI's binary preview messages (the node's progress bar).
    let withMetadata = false;
    let executing = null;
    api.addEventListener("executing", ({ detail }) => {
      executing = detail && typeof detail === "object" ? detail.node ?? null : detail ?? null;
    });
    api.addEventListener("b_preview_with_metadata", ({ detail }) => {
      withMetadata = true;
      if (detail?.blob) setPreview(detail.displayNodeId ?? detail.nodeId, detail.blob);
    });
    api.addEventListener("b_preview", ({ detail }) => {
      if (!withMetadata && executing !== null && detail instanceof Blob) setPreview(executing, detail);
    });
  },

  beforeConfigureGraph() {
    // another workflow reuses node ids: drop finished runs so they do not show on its nodes
    for (const [node, run] of [...store.runs]) if (run.finished) store.delete(node);
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== TRAINER_NODE) return;

    chainMethod(nodeType, "onNodeCreated", function () {
      const view = new MonitorView(this);
      const widget = this.addDOMWidget("dco_monitor", "dco_monitor", view.root, {
        getMinHeight: () => view.minHeight(),
        hideOnZoom: false,
        serialize: false, // not sent with the prompt
      });
      widget.serialize = false; // not stored in widgets_values
      this.dcoMonitor = view;
      const size = this.computeSize();
      this.setSize([Math.max(this.size[0], size[0], 420), Math.max(this.size[1], size[1])]);
    });

    chainMethod(nodeType, "onRemoved", function () {
      this.dcoMonitor?.dispose();
    });

    chainMethod(nodeType, "onExecuted", function (output) {
      const image = output?.images?.[0];
      if (!image) return;
      // ComfyUI draws a node's progress previews in preference to its outputs; drop the last
      // validation preview so the returned curve image shows under the node (the fallback view).
      const locator = this.graph && this.graph.isRootGraph === false ? `${this.graph.id}:${this.id}` : String(this.id);
      const previews = app.nodePreviewImages?.[locator];
      if (previews) {
        delete app.nodePreviewImages[locator];
        for (const url of previews) if (typeof url === "string" && url.startsWith("blob:")) URL.revokeObjectURL(url);
      }
      const run = store.get(this.id);
      if (run) {
        const params = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder ?? "", type: image.type ?? "temp" });
        run.finalImage = api.apiURL(`/view?${params}`);
        redraw(this.id);
      }
      this.setDirtyCanvas?.(true, true);
    });

    // The image ComfyUI adds under the node after the run (the curve) needs room: grow the node
    // rather than let the image spill over the nodes below (the classic canvas; Nodes 2.0 sizes itself).
    chainMethod(nodeType, "onDrawForeground", function () {
      if (this.flags?.collapsed) return;
      const min = this.computeSize();
      if (this.size[1] < min[1] - 1) this.setSize([this.size[0], min[1]]);
    });
  },
});
