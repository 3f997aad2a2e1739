// The training monitor's data handling (web/dco_monitor_data.js): `node --test tests/js/`.
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  MonitorStore, RingBuffer, TrainRun, axisRange, formatDuration, formatValue, perImageLines, phaseFraction, phaseLine,
  previewCost, previewCostLine, statusLine, takeStockPreview,
} from "../../web/dco_monitor_data.js";

function running(node, run, step, extra = {}) {
  return {
    node, run, status: "running", total: 10, step, loss: 0.7 - step * 0.01, err_model: 0.1 + step, err_ref: 0.2,
    reward_gap: 0.1, lr: 5e-5, elapsed_s: step, eta_s: 10 - step, it_s: 2.5, ...extra,
  };
}

test("ring buffer keeps items in order below capacity", () => {
  const b = new RingBuffer(4);
  [1, 2, 3].forEach((x) => b.push(x));
  assert.equal(b.length, 3);
  assert.deepEqual(b.toArray(), [1, 2, 3]);
  assert.deepEqual([...b], [1, 2, 3]);
  assert.equal(b.at(0), 1);
  assert.equal(b.at(-1), 3);
  assert.equal(b.last(), 3);
  assert.equal(b.at(3), undefined);
  assert.equal(b.at(-4), undefined);
});

test("ring buffer drops the oldest items when full, across several wrap-arounds", () => {
  const b = new RingBuffer(3);
  for (let i = 1; i <= 10; i++) b.push(i);
  assert.equal(b.length, 3);
  assert.deepEqual(b.toArray(), [8, 9, 10]);
  assert.equal(b.dropped, 7);
  assert.equal(b.at(0), 8);
  assert.equal(b.at(-1), 10);
});

test("ring buffer pops from the newest end and clears", () => {
  const b = new RingBuffer(3);
  for (let i = 1; i <= 5; i++) b.push(i); // holds 3, 4, 5 with a wrapped start
  b.popWhile((x) => x >= 4);
  assert.deepEqual(b.toArray(), [3]);
  b.push(6);
  b.push(7);
  b.push(8);
  assert.deepEqual(b.toArray(), [6, 7, 8]);
  b.clear();
  assert.equal(b.length, 0);
  assert.deepEqual(b.toArray(), []);
  b.push(9);
  assert.deepEqual(b.toArray(), [9]);
});

test("ring buffer refuses a capacity below one", () => {
  assert.throws(() => new RingBuffer(0), /capacity of at least 1/);
  assert.throws(() => new RingBuffer(2.5), RangeError);
});

test("a run collects steps, skips missing values per series and keeps drift / fit apart", () => {
  const store = new MonitorStore();
  assert.equal(store.apply({ node: "7", run: "a1", status: "start", total: 10 }).status, "start");
  store.apply(running("7", "a1", 1, { err_ref: null, reward_gap: null }));
  store.apply(running("7", "a1", 2, { drift: 0.01, fit: 0.5 }));
  store.apply(running("7", "a1", 3));
  const run = store.get(7); // numeric ids find the string key
  assert.equal(run.id, "a1");
  assert.equal(run.status, "running");
  assert.equal(run.total, 10);
  assert.equal(run.step, 3);
  assert.equal(run.itPerSec, 2.5);
  assert.deepEqual(run.series("loss")[0], [1, 2, 3]);
  assert.deepEqual(run.series("err_ref")[0], [2, 3], "a null err_ref (beta <= 0) is not drawn");
  assert.deepEqual(run.series("drift"), [[2], [0.01]]);
  assert.deepEqual(run.series("fit"), [[2], [0.5]]);
  store.apply({ node: "7", run: "a1", status: "done", total: 10, step: 3 });
  assert.equal(run.status, "done");
  assert.equal(run.finished, true);
  assert.equal(run.etaS, 0);
});

test("the drift meter's step-0 baseline feeds only the drift chart", () => {
  const store = new MonitorStore();
  store.apply({ node: "7", run: "b1", status: "start", total: 10 });
  store.apply({ node: "7", run: "b1", status: "running", total: 10, step: 0, drift: 0, fit: 0.4, drift_s: 0.1 });
  const run = store.get("7");
  assert.equal(run.loss.length, 0, "no loss point for a reading without a loss");
  assert.deepEqual(run.series("drift"), [[0], [0]]);
  store.apply(running("7", "b1", 1));
  store.apply(running("7", "b1", 2, { drift: 0.02, fit: 0.3 }));
  assert.deepEqual(run.series("loss")[0], [1, 2]);
  assert.deepEqual(run.series("drift"), [[0, 2], [0, 0.02]], "later steps keep the baseline");
});

test("several trainer nodes each keep their own run", () => {
  const store = new MonitorStore();
  store.apply({ node: "2", run: "aaa", status: "start", total: 5 });
  store.apply({ node: "9", run: "bbb", status: "start", total: 3 });
  for (let s = 1; s <= 5; s++) store.apply(running("2", "aaa", s));
  store.apply(running("9", "bbb", 1));
  store.apply({ node: "9", run: "bbb", status: "error", total: 3, message: "NaN loss at step 2" });
  const a = store.get("2");
  const b = store.get("9");
  assert.equal(a.id, "aaa");
  assert.equal(a.loss.length, 5);
  assert.equal(a.status, "running");
  assert.equal(b.id, "bbb");
  assert.equal(b.loss.length, 1);
  assert.equal(b.status, "error");
  assert.equal(b.message, "NaN loss at step 2");
  assert.match(statusLine(b), /^error · NaN loss at step 2$/);
});

test("a restart after an interrupt replaces the old run and ignores its late events", () => {
  const store = new MonitorStore();
  store.apply({ node: "4", run: "old", status: "start", total: 10 });
  for (let s = 1; s <= 4; s++) store.apply(running("4", "old", s));
  store.apply({ node: "4", run: "old", status: "interrupted", total: 10, step: 4 });
  assert.equal(store.get("4").status, "interrupted");
  assert.match(statusLine(store.get("4")), /^interrupted · step 4\/10/);
  // resume = latest: a new execution, a new run id, steps continue at 5
  store.apply({ node: "4", run: "new", status: "start", total: 10 });
  const run = store.get("4");
  assert.equal(run.id, "new");
  assert.equal(run.loss.length, 0, "the new run starts with an empty chart");
  for (let s = 5; s <= 7; s++) store.apply(running("4", "new", s));
  assert.deepEqual(run.series("loss")[0], [5, 6, 7]);
  assert.equal(store.apply(running("4", "old", 5)), null, "a late event of the old run is dropped");
  assert.equal(store.get("4").id, "new");
  assert.deepEqual(store.get("4").series("loss")[0], [5, 6, 7]);
});

test("a run that goes back in steps forgets the steps from there on", () => {
  const store = new MonitorStore();
  for (let s = 1; s <= 6; s++) store.apply(running("1", "r", s, s % 2 ? {} : { drift: s, fit: s }));
  store.apply(running("1", "r", 4));
  const run = store.get("1");
  assert.deepEqual(run.series("loss")[0], [1, 2, 3, 4]);
  assert.deepEqual(run.series("drift")[0], [2]);
});

test("a long run keeps the newest points within the ring buffer's capacity", () => {
  const store = new MonitorStore({ capacity: 50 });
  for (let s = 1; s <= 120; s++) store.apply(running("3", "long", s, { total: 120 }));
  const run = store.get("3");
  assert.equal(run.loss.length, 50);
  assert.equal(run.loss.at(0).step, 71);
  assert.equal(run.loss.last().step, 120);
  assert.equal(run.loss.dropped, 70);
});

test("malformed events are ignored", () => {
  const store = new MonitorStore();
  for (const ev of [null, 5, {}, { node: "1" }, { node: "1", run: "" , status: "start" }, { node: "1", run: "x", status: "bogus" },
    { run: "x", status: "start" }]) {
    assert.equal(store.apply(ev), null, JSON.stringify(ev));
  }
  assert.equal(store.runs.size, 0);
  store.apply({ node: "1", run: "x", status: "start", total: 3 });
  assert.equal(store.apply({ node: "1", run: "x", status: "running", total: 3 }), null, "running without a step");
  assert.equal(store.apply(running("1", "x", 1, { loss: Number.NaN })).loss.last().loss, null, "NaN becomes a gap");
});

test("previews belong to the node's current run", () => {
  const store = new MonitorStore();
  assert.equal(store.setPreview("5", "blob:1"), null, "no run, nothing stored");
  store.apply({ node: "5", run: "p", status: "start", total: 2 });
  assert.equal(store.setPreview("5", "blob:1"), null);
  assert.equal(store.setPreview("5", "blob:2"), "blob:1", "the replaced URL is returned for revoking");
  assert.equal(store.get("5").preview, "blob:2");
  store.apply({ node: "5", run: "q", status: "start", total: 2 });
  assert.equal(store.get("5").preview, null);
});

test("axis range, durations, values and the header line", () => {
  assert.deepEqual(axisRange([]), [0, 1]);
  assert.deepEqual(axisRange([2, 2]), [1, 3]);
  assert.deepEqual(axisRange([0, 10, Number.NaN]), [0, 10.5], "never-negative data keeps a zero floor");
  assert.deepEqual(axisRange([-1, 9]), [-1.5, 9.5], "5 % headroom on both sides");
  assert.equal(formatDuration(null), "–");
  assert.equal(formatDuration(65), "1:05");
  assert.equal(formatDuration(3725), "1:02:05");
  assert.equal(formatValue(0.693147), "0.6931");
  assert.equal(formatValue(5e-6), "5.00e-6");
  assert.equal(formatValue(null), "–");
  assert.equal(statusLine(null), "waiting for training to start");
  const run = new TrainRun("1", "r");
  run.apply(running("1", "r", 3));
  assert.equal(statusLine(run), "step 3/10 · 2.5 it/s · ETA 0:07");
});

// The events as nodes/trainer.py _Progress.event sends them: {node, run, status, total, **data}, so a
// setup event's `total` is the phase's count.
function setup(node, run, phase, done, total) {
  return { node, run, status: "setup", total, phase, done };
}

test("set-up phases show with their progress and never resize the run", () => {
  const store = new MonitorStore();
  store.apply({ node: "7", run: "s1", status: "start", total: 40 });
  assert.equal(store.apply(setup("7", "s1", "Loading models", 0, 3)).status, "setup");
  const run = store.get("7");
  assert.equal(run.total, 40, "the phase's total is not the run's");
  assert.equal(statusLine(run), "setting up · Loading models 0/3 · 40 steps to train");
  store.apply(setup("7", "s1", "Caching prompt embeddings", 3, 10));
  assert.deepEqual(run.phase, { name: "Caching prompt embeddings", done: 3, total: 10 });
  assert.equal(phaseLine(run.phase), "Caching prompt embeddings 3/10");
  assert.equal(phaseFraction(run.phase), 0.3);
  store.apply(setup("7", "s1", "Training", 0, 0));
  assert.equal(phaseLine(run.phase), "Training", "a phase without counts shows only its name");
  assert.equal(phaseFraction(run.phase), null);
  store.apply(running("7", "s1", 1, { total: 40 }));
  assert.equal(run.status, "running");
  assert.equal(run.phase, null, "the first step ends the set-up");
  assert.equal(run.total, 40);
  assert.match(statusLine(run), /^step 1\/40 · 2.5 it\/s · ETA /);
});

test("a phase during training (preview, saving) shows beside the step and keeps the run running", () => {
  const store = new MonitorStore();
  store.apply({ node: "3", run: "t", status: "start", total: 20 });
  for (let s = 1; s <= 10; s++) store.apply(running("3", "t", s, { total: 20 }));
  store.apply(setup("3", "t", "Rendering preview", 12, 25));
  const run = store.get("3");
  assert.equal(run.status, "running", "a phase mid-run does not go back to the set-up state");
  assert.equal(run.step, 10);
  assert.equal(run.loss.length, 10);
  assert.match(statusLine(run), /^step 10\/20 · .* · Rendering preview 12\/25$/);
  store.apply(setup("3", "t", "Saving", 0, 1));
  assert.match(statusLine(run), / · Saving 0\/1$/);
  store.apply({ node: "3", run: "t", status: "done", total: 20, step: 20 });
  assert.equal(run.phase, null);
  assert.doesNotMatch(statusLine(run), /Saving/);
});

test("a setup event without a phase name is ignored", () => {
  const store = new MonitorStore();
  store.apply({ node: "1", run: "x", status: "start", total: 5 });
  assert.equal(store.apply({ node: "1", run: "x", status: "setup", total: 3, done: 1 }), null);
  assert.equal(store.get("1").status, "start");
});

test("each preview's cost is recorded without touching the charts", () => {
  const store = new MonitorStore();
  store.apply({ node: "5", run: "p", status: "start", total: 40 });
  for (let s = 1; s <= 20; s++) store.apply(running("5", "p", s, { total: 40, elapsed_s: 10 * s }));
  const run = store.get("5");
  assert.equal(previewCost(run), null);
  assert.equal(previewCostLine(run), "");
  store.apply(setup("5", "p", "Rendering preview", 25, 25));
  // the cost event carries the step it was rendered at: it must not drop that step's loss point
  const changed = store.apply({ node: "5", run: "p", status: "running", total: 40, step: 20, preview_s: 12.5,
    preview_steps_equiv: 6.2 });
  assert.equal(changed, run);
  assert.equal(run.loss.length, 20, "the step-20 loss point stays");
  assert.equal(run.loss.last().step, 20);
  assert.equal(run.phase, null, "the preview phase ends with its cost");
  assert.deepEqual(run.previews, [{ step: 20, seconds: 12.5, stepsEquiv: 6.2 }]);
  assert.equal(previewCostLine(run), "last preview 12.5 s ≈ 6.2 steps (1 preview) · 6 % of the time so far");
  for (let s = 21; s <= 40; s++) store.apply(running("5", "p", s, { total: 40, elapsed_s: 10 * s + 12.5 }));
  store.apply({ node: "5", run: "p", status: "running", total: 40, step: 40, preview_s: 11.5, preview_steps_equiv: 5.8 });
  const cost = previewCost(run);
  assert.equal(cost.count, 2);
  assert.equal(cost.seconds, 24);
  assert.equal(cost.last.stepsEquiv, 5.8);
  assert.equal(previewCostLine(run), "last preview 11.5 s ≈ 5.8 steps (2 previews, 0:24 in all) · 6 % of the time so far");
  assert.equal(run.loss.length, 40);
});

test("a preview cost that is not a number is ignored, one without a step takes the current step", () => {
  const store = new MonitorStore();
  store.apply({ node: "5", run: "p", status: "start", total: 4 });
  store.apply(running("5", "p", 2, { total: 4, elapsed_s: null }));
  assert.equal(store.apply({ node: "5", run: "p", status: "running", total: 4, preview_s: null }), null);
  store.apply({ node: "5", run: "p", status: "running", total: 4, preview_s: 3 });
  const run = store.get("5");
  assert.deepEqual(run.previews, [{ step: 2, seconds: 3, stepsEquiv: null }]);
  assert.equal(previewCostLine(run), "last preview 3 s (1 preview)", "no share without an elapsed time");
});

test("the done event's per-image errors come worst fit first, with its warnings", () => {
  const store = new MonitorStore();
  store.apply({ node: "9", run: "d", status: "start", total: 2 });
  store.apply(running("9", "d", 2, { total: 2 }));
  store.apply({
    node: "9", run: "d", status: "done", total: 2, step: 2,
    per_image: [
      { name: "a.png", err_lora: 0.1, err_base: 0.3 },
      { name: "b.png", err_lora: 0.4, err_base: 0.35 },
      null,
      { name: "c.png", err_lora: null, err_base: 0.2 },
      { err_lora: 1 },
      { name: "d.png", err_lora: 0.2, err_base: 0.25 },
    ],
    warnings: ["only 2 images: DCO needs at least 3 to generalise", "", 5],
  });
  const run = store.get("9");
  assert.deepEqual(run.perImage.map((r) => r.name), ["b.png", "d.png", "a.png", "c.png"], "rows without a name are dropped");
  assert.deepEqual(run.warnings, ["only 2 images: DCO needs at least 3 to generalise"]);
  assert.deepEqual(perImageLines(run, 2), [
    "b.png: 0.4 with the LoRA, 0.35 without",
    "d.png: 0.2 with the LoRA, 0.25 without",
    "… 2 more (all on the curve image)",
  ]);
  assert.deepEqual(perImageLines(run, 5).at(-1), "c.png: – with the LoRA, 0.2 without");
});

test("a new run on the same node starts without the old run's phase, previews or per-image rows", () => {
  const store = new MonitorStore();
  store.apply({ node: "4", run: "one", status: "start", total: 2 });
  store.apply(setup("4", "one", "Preparing data", 1, 2));
  store.apply({ node: "4", run: "one", status: "running", total: 2, step: 1, preview_s: 2 });
  store.apply({ node: "4", run: "one", status: "done", total: 2, step: 2, per_image: [{ name: "a", err_lora: 1, err_base: 2 }],
    warnings: ["w"] });
  store.apply(setup("4", "two", "Loading models", 0, 3)); // the next execution's first event
  const run = store.get("4");
  assert.equal(run.id, "two");
  assert.equal(run.status, "setup");
  assert.deepEqual([run.previews, run.perImage, run.warnings], [[], [], []]);
  assert.equal(run.total, 0, "the phase's count is not taken for the run's total");
  assert.equal(statusLine(run), "setting up · Loading models 0/3 · ? steps to train");
  assert.equal(store.apply(setup("4", "one", "Saving", 0, 1)), null, "the old run's late events are dropped");
  store.apply({ node: "4", run: "two", status: "start", total: 30 });
  assert.equal(statusLine(run), "setting up · Loading models 0/3 · 30 steps to train", "a late start keeps the phase");
});

test("the stock preview is taken out of ComfyUI's list, with its copies for the subgraph levels", () => {
  const list = ["blob:http://x/1"];
  const other = ["blob:http://x/2"];
  const previews = { 7: list, "5:7": list, 5: list, 9: other };
  assert.deepEqual(takeStockPreview(previews, "7"), ["blob:http://x/1"]);
  assert.deepEqual(previews, { 9: other }, "every copy of the trainer's list goes, another node's stays");
  assert.deepEqual(takeStockPreview(previews, "7"), [], "nothing left to take");
  assert.deepEqual(takeStockPreview(undefined, "7"), []);
  assert.deepEqual(takeStockPreview({ 3: ["/view?x", "blob:y"] }, "3"), ["blob:y"], "only blob: URLs are revoked");
});

test("a loss spike clips the axis instead of flattening the curve (as the curve image does)", () => {
  const values = Array.from({ length: 60 }, (_, i) => 0.69 - 0.002 * i).concat([50]);
  const [lo, hi] = axisRange(values, { clip: true });
  assert.ok(hi < 1 && lo > 0.5, `${lo} ${hi}`);
  assert.ok(axisRange(values)[1] > 50, "without clip every value is covered");
  assert.deepEqual(axisRange([0.5, 0.5, 0.5], { clip: true }), [0.25, 0.75], "few or flat values are not clipped");
  const even = Array.from({ length: 20 }, (_, i) => i);
  assert.deepEqual(axisRange(even, { clip: true }), axisRange(even), "no spike, no clipping");
});

test("a step row is a chart point whatever its preview_s; the cost event alone records the cost", () => {
  const store = new MonitorStore();
  store.apply({ node: "5", run: "p1", status: "start", total: 3 });
  assert.ok(store.apply(running("5", "p1", 1, { preview_s: null, drift: null, fit: null })), "no preview that step");
  assert.ok(store.apply(running("5", "p1", 2, { preview_s: 1.5 })), "the step that rendered a preview");
  store.apply({ node: "5", run: "p1", status: "running", total: 3, step: 2, preview_s: 1.5, preview_steps_equiv: 3 });
  const run = store.get("5");
  assert.deepEqual(run.series("loss")[0], [1, 2]);
  assert.equal(run.previews.length, 1);
});
