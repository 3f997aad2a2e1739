// Data side of the live training monitor: what the `dco.train` events mean, kept per trainer node.
// Pure ES module without DOM or ComfyUI imports, so Node's test runner imports it (tests/js/).
//
// Event payloads (nodes/trainer.py `_Progress.event`):
//   {node, run, status: "start"|"setup"|"running"|"done"|"interrupted"|"error", total, ...}
//   setup: phase ("Loading models", "Preparing data", "Caching prompt embeddings", "Training",
//          "Rendering preview", "Saving"), done, and `total` = the phase's count (it replaces the
//          run's total in the payload, so a setup event never sets the run's total)
//   running: step, loss, err_model, err_ref (null when beta <= 0), reward_gap, lr, elapsed_s, eta_s,
//            it_s, and drift / fit only on the steps where the drift meter ran; a baseline reading
//            before training has step 0, drift and fit, and no loss; after each validation preview
//            one event with preview_s and preview_steps_equiv (its cost) and no loss
//   done: step, per_image [{name, err_lora, err_base}], warnings [str]; interrupted: step;
//   error: message
// Each execution of a trainer sends a new 12-hex `run` id; a node always shows its newest run.

export const DEFAULT_CAPACITY = 4096;
export const STATUSES = ["start", "setup", "running", "done", "interrupted", "error"];
export const MAX_PER_IMAGE = 256; // rows kept from a done event's per_image

/** A fixed-size FIFO: pushing into a full buffer drops the oldest item. */
export class RingBuffer {
  constructor(capacity = DEFAULT_CAPACITY) {
    if (!Number.isInteger(capacity) || capacity < 1) {
      throw new RangeError(`A ring buffer needs a capacity of at least 1, not ${capacity}.`);
    }
    this.capacity = capacity;
    this.items = new Array(capacity);
    this.start = 0;
    this.length = 0;
    this.dropped = 0; // how many items fell off the front since the last clear()
  }

  push(item) {
    if (this.length < this.capacity) {
      this.items[(this.start + this.length) % this.capacity] = item;
      this.length += 1;
    } else {
      this.items[this.start] = item;
      this.start = (this.start + 1) % this.capacity;
      this.dropped += 1;
    }
  }

  /** Item i counted from the oldest (negative i counts from the newest); undefined outside. */
  at(i) {
    const k = i < 0 ? this.length + i : i;
    if (k < 0 || k >= this.length) return undefined;
    return this.items[(this.start + k) % this.capacity];
  }

  last() {
    return this.at(-1);
  }

  /** Drop items from the newest end while `pred(item)` holds. */
  popWhile(pred) {
    while (this.length > 0 && pred(this.at(-1))) {
      this.items[(this.start + this.length - 1) % this.capacity] = undefined;
      this.length -= 1;
    }
  }

  clear() {
    this.items = new Array(this.capacity);
    this.start = 0;
    this.length = 0;
    this.dropped = 0;
  }

  toArray() {
    const out = new Array(this.length);
    for (let i = 0; i < this.length; i++) out[i] = this.at(i);
    return out;
  }

  [Symbol.iterator]() {
    return this.toArray()[Symbol.iterator]();
  }
}

/** A finite number, or null (JSON has no NaN; the trainer sends null for missing values). */
export function num(value) {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

/** One execution of one trainer node. */
export class TrainRun {
  constructor(node, id, capacity = DEFAULT_CAPACITY) {
    this.node = node;
    this.id = id;
    this.status = "start";
    this.total = 0;
    this.step = 0;
    this.itPerSec = null;
    this.etaS = null;
    this.elapsedS = null;
    this.lr = null;
    this.message = "";
    this.loss = new RingBuffer(capacity); // {step, loss, err_model, err_ref, reward_gap}
    this.monitor = new RingBuffer(capacity); // {step, drift, fit}
    this.preview = null; // URL of the latest validation preview
    this.finalImage = null; // URL of the final curve image (onExecuted)
    this.phase = null; // {name, done, total} of the current set-up phase; cleared by the next step
    this.previews = []; // {step, seconds, stepsEquiv} per validation preview
    this.perImage = []; // {name, err_lora, err_base}, worst fit (highest err_lora) first
    this.warnings = []; // dataset warnings of the done event
    this.events = 0;
  }

  get finished() {
    return this.status === "done" || this.status === "interrupted" || this.status === "error";
  }

  apply(ev) {
    this.events += 1;
    const status = STATUSES.includes(ev.status) ? ev.status : null;
    const total = num(ev.total);
    if (total !== null && total > 0 && status !== "setup") this.total = total;
    if (status === "setup") {
      if (typeof ev.phase !== "string" || !ev.phase) return false;
      const done = num(ev.done);
      const of = num(ev.total);
      this.phase = { name: ev.phase, done: done ?? 0, total: of !== null && of > 0 ? of : null };
      if (this.status === "start" || this.status === "setup") this.status = "setup";
      return true;
    }
    if (status === "running" && ev.preview_s !== undefined && ev.preview_s !== null && ev.loss === undefined) {
      // a validation preview's cost: no chart point, so the replay rule below must not see its step
      // (a step row carries its step's preview_s too, null or not, and the same cost comes again alone)
      const seconds = num(ev.preview_s);
      if (seconds === null) return false;
      this.previews.push({ step: num(ev.step) ?? this.step, seconds, stepsEquiv: num(ev.preview_steps_equiv) });
      if (this.phase?.name === "Rendering preview") this.phase = null;
      return true;
    }
    if (status === "running") {
      const step = num(ev.step);
      if (step === null) return false;
      this.phase = null;
      // a step the buffer already holds means the run went back (a replay): forget from there on
      this.loss.popWhile((p) => p.step >= step);
      this.monitor.popWhile((p) => p.step >= step);
      // a reading without a loss (the drift meter's step-0 baseline) only feeds the drift chart;
      // a loss that is there but not a number (NaN) still makes a point, drawn as a gap
      if (ev.loss !== undefined && ev.loss !== null) {
        this.loss.push({
          step,
          loss: num(ev.loss),
          err_model: num(ev.err_model),
          err_ref: num(ev.err_ref),
          reward_gap: num(ev.reward_gap),
        });
      }
      const drift = num(ev.drift);
      const fit = num(ev.fit);
      if (drift !== null || fit !== null) this.monitor.push({ step, drift, fit });
      this.step = step;
      this.itPerSec = num(ev.it_s);
      this.etaS = num(ev.eta_s);
      this.elapsedS = num(ev.elapsed_s);
      this.lr = num(ev.lr);
      this.status = "running";
    } else if (status === "start") {
      this.status = this.phase ? "setup" : "start"; // a start after the first phase keeps showing the phase
    } else if (status === "done" || status === "interrupted") {
      const step = num(ev.step);
      if (step !== null) this.step = step;
      this.status = status;
      this.phase = null;
      this.etaS = status === "done" ? 0 : null;
      if (Array.isArray(ev.per_image)) this.perImage = perImageRows(ev.per_image);
      if (Array.isArray(ev.warnings)) this.warnings = ev.warnings.filter((w) => typeof w === "string" && w);
    } else if (status === "error") {
      this.status = "error";
      this.phase = null;
      this.message = typeof ev.message === "string" ? ev.message : "training failed";
      this.etaS = null;
    } else {
      return false;
    }
    return true;
  }

  /** [steps, values] of one field of the loss or monitor buffer, nulls left out. */
  series(field) {
    const buf = field === "drift" || field === "fit" ? this.monitor : this.loss;
    const xs = [];
    const ys = [];
    for (const p of buf) {
      if (p[field] !== null && p[field] !== undefined) {
        xs.push(p.step);
        ys.push(p[field]);
      }
    }
    return [xs, ys];
  }
}

/** The done event's per-image errors as clean rows, the worst fit (highest err_lora) first. */
export function perImageRows(list) {
  const rows = [];
  for (const r of list) {
    if (!r || typeof r !== "object" || typeof r.name !== "string") continue;
    rows.push({ name: r.name, err_lora: num(r.err_lora), err_base: num(r.err_base) });
  }
  rows.sort((a, b) => (b.err_lora ?? -Infinity) - (a.err_lora ?? -Infinity) || a.name.localeCompare(b.name));
  return rows.slice(0, MAX_PER_IMAGE);
}

/**
 * What the validation previews cost so far: {count, seconds, last, share} where `last` is the newest
 * preview's {step, seconds, stepsEquiv} and `share` the fraction of the elapsed time spent on
 * previews (null while the elapsed time is unknown).
 */
export function previewCost(run) {
  if (!run || run.previews.length === 0) return null;
  const seconds = run.previews.reduce((s, p) => s + p.seconds, 0);
  const share = run.elapsedS && run.elapsedS > 0 ? Math.min(1, seconds / run.elapsedS) : null;
  return { count: run.previews.length, seconds, last: run.previews[run.previews.length - 1], share };
}

/** The line the monitor shows about preview cost, or "" before the first preview. */
export function previewCostLine(run) {
  const cost = previewCost(run);
  if (!cost) return "";
  const { last } = cost;
  const equiv = last.stepsEquiv === null ? "" : ` ≈ ${formatValue(last.stepsEquiv)} steps`;
  const share = cost.share === null ? "" : ` · ${Math.round(cost.share * 100)} % of the time so far`;
  const count = cost.count === 1 ? "1 preview" : `${cost.count} previews, ${formatDuration(cost.seconds)} in all`;
  return `last preview ${formatValue(last.seconds)} s${equiv} (${count})${share}`;
}

/** A set-up phase as text: "Caching prompt embeddings 3/10", or just its name without counts. */
export function phaseLine(phase) {
  if (!phase) return "";
  return phase.total ? `${phase.name} ${Math.min(phase.done, phase.total)}/${phase.total}` : phase.name;
}

/** The phase's progress in [0, 1], or null when it has no counts. */
export function phaseFraction(phase) {
  if (!phase || !phase.total) return null;
  return Math.max(0, Math.min(1, phase.done / phase.total));
}

/**
 * The per-image lines the monitor shows after a run: the `limit` worst-fitting images, each with its
 * error with the LoRA on and off.
 */
export function perImageLines(run, limit = 3) {
  if (!run || run.perImage.length === 0) return [];
  const lines = run.perImage.slice(0, limit).map(
    (r) => `${r.name}: ${formatValue(r.err_lora)} with the LoRA, ${formatValue(r.err_base)} without`,
  );
  if (run.perImage.length > limit) lines.push(`… ${run.perImage.length - limit} more (all on the curve image)`);
  return lines;
}

/**
 * Remove the preview list stored under `key` from ComfyUI's `previews` (app.nodePreviewImages),
 * with every copy of the same list (ComfyUI stores it once per subgraph level of the node), so it is
 * not drawn under the node. Returns the blob: URLs it held, for the caller to revoke.
 */
export function takeStockPreview(previews, key) {
  const urls = previews?.[key];
  if (!urls) return [];
  for (const [k, value] of Object.entries(previews)) if (value === urls) delete previews[k];
  return [...urls].filter((url) => typeof url === "string" && url.startsWith("blob:"));
}

/**
 * Every trainer node's newest run, keyed by the node id as a string (the events' `node`).
 * A run id the node has already moved past is ignored, so a late event of an old run cannot
 * overwrite the new one.
 */
export class MonitorStore {
  constructor({ capacity = DEFAULT_CAPACITY, keepIds = 64 } = {}) {
    this.capacity = capacity;
    this.keepIds = keepIds;
    this.runs = new Map();
    this.retired = new Map(); // node -> list of run ids it moved past
  }

  /** Apply one event; returns the run it changed, or null when the event was ignored. */
  apply(ev) {
    if (!ev || typeof ev !== "object") return null;
    if (ev.node === undefined || ev.node === null || typeof ev.run !== "string" || !ev.run) return null;
    if (!STATUSES.includes(ev.status)) return null;
    const node = String(ev.node);
    let run = this.runs.get(node);
    if (!run || run.id !== ev.run) {
      const retired = this.retired.get(node) ?? [];
      if (retired.includes(ev.run)) return null;
      if (run) {
        retired.push(run.id);
        if (retired.length > this.keepIds) retired.shift();
        this.retired.set(node, retired);
      }
      run = new TrainRun(node, ev.run, this.capacity);
      this.runs.set(node, run);
    }
    return run.apply(ev) ? run : null;
  }

  get(node) {
    return this.runs.get(String(node)) ?? null;
  }

  /** Remember a preview image URL for the node's current run; returns the URL it replaces. */
  setPreview(node, url) {
    const run = this.get(node);
    if (!run) return null;
    const old = run.preview;
    run.preview = url;
    return old;
  }

  delete(node) {
    this.runs.delete(String(node));
    this.retired.delete(String(node));
  }

  clear() {
    this.runs.clear();
    this.retired.clear();
  }
}

export const CLIP_QUANTILE = 0.98; // as dco_train/plot.py: a spike cannot flatten the loss curve

/**
 * [lo, hi] covering `values` with a little headroom; a flat or empty series still gets a band, and
 * data that is never negative (losses, errors) never gets a negative axis. With `clip`, the top
 * ends a little above the 98th percentile when the largest values lie far above it (a spike);
 * the chart draws those points on the top edge.
 */
export function axisRange(values, { clip = false } = {}) {
  const finite = values.filter((v) => Number.isFinite(v));
  if (finite.length === 0) return [0, 1];
  const lo = Math.min(...finite);
  let hi = Math.max(...finite);
  if (clip && finite.length >= 10) {
    const sorted = [...finite].sort((a, b) => a - b);
    const q = sorted[Math.min(sorted.length - 1, Math.floor(CLIP_QUANTILE * (sorted.length - 1)))];
    if (hi - lo > 1e-12 && hi - q > 0.5 * (q - lo)) hi = q + 0.1 * (q - lo);
  }
  const pad = hi - lo < 1e-12 ? 0.5 * (Math.abs(lo) || 1) : 0.05 * (hi - lo);
  return [lo >= 0 ? Math.max(0, lo - pad) : lo - pad, hi + pad];
}

/** Seconds as m:ss or h:mm:ss; "–" when unknown. */
export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds) || seconds < 0) return "–";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, "0");
  return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
}

/** A number in 4 significant digits (exponent form for tiny or huge values). */
export function formatValue(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
  return String(Number(v.toPrecision(4)));
}

/** The monitor's header line for a run (or for no run yet). */
export function statusLine(run) {
  if (!run) return "waiting for training to start";
  const steps = `step ${run.step}/${run.total || "?"}`;
  switch (run.status) {
    case "start":
      return `starting · ${run.total || "?"} steps`;
    case "setup":
      return `setting up · ${phaseLine(run.phase)} · ${run.total || "?"} steps to train`;
    case "running": {
      const speed = run.itPerSec === null ? "– it/s" : `${formatValue(run.itPerSec)} it/s`;
      const phase = run.phase ? ` · ${phaseLine(run.phase)}` : "";
      return `${steps} · ${speed} · ETA ${formatDuration(run.etaS)}${phase}`;
    }
    case "done":
      return `done · ${steps} · ${formatDuration(run.elapsedS)}`;
    case "interrupted":
      return `interrupted · ${steps} (a checkpoint was saved; resume = latest continues it)`;
    case "error":
      return `error · ${run.message}`;
    default:
      return steps;
  }
}
