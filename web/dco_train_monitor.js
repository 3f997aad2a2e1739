// dco.train_monitor: a live training monitor on every DCO Trainer node.
//
// A DOM widget (not serialised, so widgets_values stay aligned with the Python inputs) shows
// step / total, it/s and ETA, a loss chart (loss, err_model, err_ref), a prior-drift / fit chart
// and the latest validation preview, fed by the trainer's `dco.train` websocket events. The data
// lives in a store keyed by node id, outside the widget, so it survives collapse, zoom and redraws,
// and several trainers in one graph each keep their own run. After the run the node also shows the
// final curve image that the node returns (ui.PreviewImage): the fallback for renderers without DOM
// widgets.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { TRAIN_EVENT, TRAINER_NODE, chainMethod } from "./dco_shared.js";
import { MonitorStore, formatValue, statusLine } from "./dco_monitor_data.js";
import { COLORS, drawChart } from "./dco_chart.js";

export const store = new MonitorStore();
const views = new Set();
const MIN_HEIGHT = 230;

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
    this.values = document.createElement("div");
    Object.assign(this.values.style, { whiteSpace: "nowrap", overflow: "hidden", color: "#aaa", flex: "0 0 auto" });
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
    this.root.append(this.header, this.values, this.lossCanvas, row);
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
    const first = run?.loss.at(0)?.step ?? 0;
    const xDomain = run ? [Math.min(first, run.total || first), Math.max(run.total, run.step)] : null;
    const lossCtx = this.canvasContext(this.lossCanvas);
    if (lossCtx) {
      const series = ["loss", "err_model", "err_ref"].map((name) => {
        const [xs, ys] = run ? run.series(name) : [[], []];
        return { name, color: COLORS[name], axis: name === "loss" ? "left" : "right", xs, ys };
      });
      this.drawn.loss = drawChart(...lossCtx, series, { xDomain, empty: run ? "waiting for the first step" : "not trained yet" });
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

  dispose() {
    this.resize.disconnect();
    views.delete(this);
  }
}

function redraw(nodeId) {
  for (const view of views) if (String(view.node.id) === String(nodeId)) view.schedule();
}

function isTrainer(nodeId) {
  for (const view of views) if (String(view.node.id) === String(nodeId)) return true;
  return false;
}

function setPreview(nodeId, blob) {
  if (!isTrainer(nodeId) || !store.get(nodeId)) return;
  const old = store.setPreview(nodeId, URL.createObjectURL(blob));
  if (old) URL.revokeObjectURL(old);
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
        getMinHeight: () => MIN_HEIGHT,
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

    // The image preview ComfyUI adds under the node (validation previews, then the curve) needs room:
    // grow the node rather than let the image spill over the nodes below.
    chainMethod(nodeType, "onDrawForeground", function () {
      if (this.flags?.collapsed) return;
      const min = this.computeSize();
      if (this.size[1] < min[1] - 1) this.setSize([this.size[0], min[1]]);
    });
  },
});
