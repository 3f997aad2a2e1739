// A small line chart drawn with the canvas 2D API (no charting library: everything under web/
// is auto-loaded by ComfyUI). Two y axes, so the DCO loss (~0.69 at the start) and the errors
// (whatever the model's scale) are both readable. No DOM or ComfyUI imports.

import { axisRange, formatValue } from "./dco_monitor_data.js";

// The colours of dco_train/plot.py's final curve image, so the live chart and the PNG agree.
export const COLORS = {
  loss: "rgb(31,119,180)",
  err_model: "rgb(214,39,40)",
  err_ref: "rgb(44,160,44)",
  drift: "rgb(148,103,189)",
  fit: "rgb(255,127,14)",
};

const FONT = "10px sans-serif";

/**
 * Draw `series` ([{name, color, axis: "left"|"right", clip?, xs, ys}]) into `ctx` at (0, 0, w, h), in CSS
 * pixels. `xDomain` fixes the step range (e.g. [first, total]); `empty` is shown without data.
 * Returns the number of points drawn.
 */
export function drawChart(ctx, w, h, series, { title = "", xDomain = null, empty = "no data yet" } = {}) {
  ctx.save();
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = "rgba(0,0,0,0.25)";
  ctx.fillRect(0, 0, w, h);
  ctx.font = FONT;
  ctx.textBaseline = "top";

  const left = series.filter((s) => s.axis !== "right" && s.xs.length);
  const right = series.filter((s) => s.axis === "right" && s.xs.length);
  const ranges = [left, right].map((group) =>
    group.length ? axisRange(group.flatMap((s) => s.ys), { clip: group.some((s) => s.clip) }) : null);
  const labelWidth = (range) =>
    range ? Math.max(...range.map((v) => ctx.measureText(formatValue(v)).width)) + 6 : 0;
  const pad = { l: Math.max(28, labelWidth(ranges[0])), r: right.length ? Math.max(28, labelWidth(ranges[1])) : 8, t: 16, b: 14 };
  const pw = Math.max(10, w - pad.l - pad.r);
  const ph = Math.max(10, h - pad.t - pad.b);

  // legend doubles as the title line
  let x = 4;
  if (title) {
    ctx.fillStyle = "#bbb";
    ctx.fillText(title, x, 3);
    x += ctx.measureText(title).width + 10;
  }
  for (const s of series) {
    ctx.fillStyle = s.color;
    ctx.fillRect(x, 6, 8, 3);
    x += 11;
    ctx.fillStyle = "#ddd";
    const label = s.axis === "right" ? `${s.name} (right)` : s.name;
    ctx.fillText(label, x, 3);
    x += ctx.measureText(label).width + 10;
  }

  ctx.strokeStyle = "rgba(255,255,255,0.25)";
  ctx.lineWidth = 1;
  ctx.strokeRect(pad.l + 0.5, pad.t + 0.5, pw, ph);

  const allX = [...left, ...right].flatMap((s) => s.xs);
  if (allX.length === 0) {
    ctx.fillStyle = "#999";
    ctx.fillText(empty, pad.l + 6, pad.t + 6);
    ctx.restore();
    return 0;
  }
  let [x0, x1] = xDomain ?? [Math.min(...allX), Math.max(...allX)];
  x0 = Math.min(x0, ...allX);
  x1 = Math.max(x1, ...allX);
  if (x1 - x0 < 1) x1 = x0 + 1;
  const sx = (v) => pad.l + ((v - x0) / (x1 - x0)) * pw;

  let drawn = 0;
  for (const [group, side, range] of [[left, "left", ranges[0]], [right, "right", ranges[1]]]) {
    if (!group.length) continue;
    const [lo, hi] = range;
    const sy = (v) => pad.t + ph - ((Math.min(Math.max(v, lo), hi) - lo) / (hi - lo)) * ph; // clipped on the edge
    ctx.fillStyle = "#aaa";
    ctx.textAlign = side === "left" ? "right" : "left";
    const tx = side === "left" ? pad.l - 3 : pad.l + pw + 3;
    ctx.fillText(formatValue(hi), tx, pad.t);
    ctx.fillText(formatValue(lo), tx, pad.t + ph - 10);
    ctx.textAlign = "left";
    for (const s of group) {
      ctx.strokeStyle = s.color;
      ctx.fillStyle = s.color;
      ctx.lineWidth = 1.5;
      if (s.xs.length === 1) {
        ctx.beginPath();
        ctx.arc(sx(s.xs[0]), sy(s.ys[0]), 2.5, 0, 2 * Math.PI);
        ctx.fill();
      } else {
        ctx.beginPath();
        s.xs.forEach((xv, i) => (i ? ctx.lineTo(sx(xv), sy(s.ys[i])) : ctx.moveTo(sx(xv), sy(s.ys[i]))));
        ctx.stroke();
      }
      drawn += s.xs.length;
    }
  }
  ctx.fillStyle = "#aaa";
  ctx.fillText(`step ${x0}`, pad.l, pad.t + ph + 2);
  ctx.textAlign = "right";
  ctx.fillText(`${x1}`, pad.l + pw, pad.t + ph + 2);
  ctx.restore();
  return drawn;
}
