// Data side of the live training monitor: what the `dco.train` events mean, kept per trainer node.
// Pure ES module without DOM or ComfyUI imports, so Node's test runner imports it (tests/js/).
//
// Event payloads (nodes/trainer.py `_Progress.event`):
//   {node, run, status: "start"|"running"|"done"|"interrupted"|"error", total, ...}
//   running: step, loss, err_model, err_ref (null when beta <= 0), reward_gap, lr, elapsed_s, eta_s,
//            it_s, and drift / fit only on the steps where the drift meter ran; a baseline reading
//            before training has step 0, drift and fit, and no loss
//   done / interrupted: step; error: message
// Each execution of a trainer sends a new 12-hex `run` id; a node always shows its newest run.

export const DEFAULT_CAPACITY = 4096;
export const STATUSES = ["start", "running", "done", "interrupted", "error"];

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
    this.events = 0;
  }

  get finished() {
    return this.status === "done" || this.status === "interrupted" || this.status === "error";
  }

  apply(ev) {
    this.events += 1;
    const total = num(ev.total);
    if (total !== null && total > 0) this.total = total;
    const status = STATUSES.includes(ev.status) ? ev.status : null;
    if (status === "running") {
      const step = num(ev.step);
      if (step === null) return false;
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
      this.status = "start";
    } else if (status === "done" || status === "interrupted") {
      const step = num(ev.step);
      if (step !== null) this.step = step;
      this.status = status;
      this.etaS = status === "done" ? 0 : null;
    } else if (status === "error") {
      this.status = "error";
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

/**
 * [lo, hi] covering `values` with a little headroom; a flat or empty series still gets a band, and
 * data that is never negative (losses, errors) never gets a negative axis.
 */
export function axisRange(values) {
  const finite = values.filter((v) => Number.isFinite(v));
  if (finite.length === 0) return [0, 1];
  const lo = Math.min(...finite);
  const hi = Math.max(...finite);
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
    case "running": {
      const speed = run.itPerSec === null ? "– it/s" : `${formatValue(run.itPerSec)} it/s`;
      return `${steps} · ${speed} · ETA ${formatDuration(run.etaS)}`;
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
