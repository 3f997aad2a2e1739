"""Measured personalisation quality on a synthetic world with a learned prior (bench/world/).

    python bench/quality.py [--lrs 3e-4,1e-3,3e-3] [--steps 300] [--images 4] [--plot docs/quality_pareto.png]

It builds the world's prior (or reuses ~/.cache/comfyui-dco/world/<hash>/), prints its held-out
composition accuracy and the detectors' accuracy on rendered ground truth, then trains through
the engine (`dco_train.train.train`, nothing re-implemented) a subject the prior never saw (a
two-tone diamond, 5 images, `<obj>`) with DreamBooth-LoRA (beta 0) and DCO at several betas, with
and without textual inversion, at each learning rate of `--lrs` (the sweep that traces each
method's front), and samples each LoRA with the engine's RG sampler at RG 0/1/2/3/5 on the same
seeds. Per run and RG scale it prints:

    subject  fraction of `<obj>` samples on novel backgrounds/positions showing the two-tone diamond
    prompt   fraction of those samples whose background and position obey the prompt
    drift    fraction of unrelated prompts (no token, same seeds, RG 0) whose detected scene differs
             from the base model's; `pixel` is their mean absolute pixel change (/255)

Then it compares methods at matched subject fidelity (each method's drift and prompt fidelity
interpolated along its learning-rate front at the same subject fidelity), runs the merge (a
subject LoRA and a one-image style LoRA loaded together), and draws the Pareto plot.

Measured on 2026-12-03 (README, "Quality"), pooled over 5 training seeds (`--seed`, each sampled on
its own `--sample-seed`, joined with --from-json): at matched pattern fidelity, read along each
method's RG front, DCO at beta 50 keeps higher prompt fidelity than DreamBooth-LoRA, and its LoRA
drifts less; at RG 0 DCO draws little of the subject, and beta 250-1000 barely fit in 300 steps. One
seed is noisy: confirm a point on other seeds before trusting it. The defaults below take about
17 minutes with the prior cached (about 35 on a first run) and the default 2 worker processes (`--jobs`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import world  # noqa: E402
from world.detect import read  # noqa: E402
from world.prior import Recipe, build_prior, codec_accuracy, prior_info  # noqa: E402

from dco_train.formats import atomic_write  # noqa: E402

RGS = (0.0, 1.0, 2.0, 3.0, 5.0)
MERGE_RGS = (0.0, 3.0)  # DCO's subject shows mostly under reward guidance, so the merge is read with it too
DRIFT_SCENES = (world.Scene("circle", "blue", "white", "left"), world.Scene("star", "red", "black", "right"),
                world.Scene("triangle", "yellow", "brown", "middle"), world.Scene("square", "purple", "pink", "left"))
MERGE_PROMPTS = [world.Scene(world.SUBJECT_SHAPE, "subject", bg, pos, stripes=True).caption("<obj>")
                 for bg, pos in world.SUBJECT_NOVEL[:4]]
STYLE_PROMPTS = [world.Scene("square", "red", "black", "left", stripes=True).caption(),
                 world.Scene("star", "green", "brown", "right", stripes=True).caption()]


@dataclass(frozen=True)
class Method:
    name: str
    beta: float
    ti: bool

    @classmethod
    def parse(cls, name: str) -> "Method":
        """`db`, `db+ti`, `dco<beta>` or `dco<beta>+ti` (e.g. `dco50+ti`): DreamBooth-LoRA is beta 0."""
        core, ti = (name[:-3], True) if name.endswith("+ti") else (name, False)
        if core == "db":
            return cls(name, 0.0, ti)
        try:
            beta = float(core[3:]) if core.startswith("dco") else float("nan")
        except ValueError:
            beta = float("nan")
        if not beta > 0:
            raise ValueError(f"Unknown method {name!r}: use db, db+ti, dco<beta> or dco<beta>+ti with beta > 0, "
                             "for example dco500+ti.")
        return cls(name, beta, ti)


METHODS = tuple(Method.parse(n) for n in ("db+ti", "db", "dco50+ti", "dco50", "dco250+ti", "dco1000+ti", "dco1000"))


@dataclass
class Sampling:
    cfg: float = 5.0
    steps: int = 15
    images: int = 3  # per prompt (one batch, one seed per prompt)
    seed: int = 0  # added to every prompt's seed: another value draws an independent set of samples


def detector_accuracy(n: int = 400, seed: int = 7) -> dict[str, float]:
    """Each detector on rendered ground truth: jittered prior scenes, the held-out pairs, the
    subject (also with stripes) and the style image."""
    import random

    rng = random.Random(seed)
    scenes = world.training_scenes(n, seed) + [world.jitter(s, rng) for s in world.all_scenes(held_out=True)]
    subjects = world.subject_scenes() + [world.jitter(world.Scene(world.SUBJECT_SHAPE, "subject", bg, pos, stripes=st), rng)
                                         for bg, pos in world.SUBJECT_NOVEL for st in (False, True)]
    striped = [world.style_scene()] + [world.jitter(world.Scene(s.shape, s.colour, s.background, s.position, stripes=True), rng)
                                       for s in scenes[:100]]
    out: dict[str, list[bool]] = {k: [] for k in ("background", "position", "colour", "shape", "subject", "stripes")}
    for s in scenes + subjects + striped:
        r = read(world.render(s))
        out["background"].append(r.background == s.background)
        out["position"].append(r.position == s.position)
        out["shape"].append(r.shape == s.shape)
        out["stripes"].append(r.stripes == s.stripes)
        out["subject"].append(r.subject == (s.colour == "subject"))
        if s.colour != "subject":
            out["colour"].append(r.colour == s.colour)
    return {k: float(np.mean(v)) for k, v in out.items()}


def load_prior(folder: Path):
    from dco_train.models import load_sdxl

    return load_sdxl(folder)


def sample(comps: Any, prompt: str, seed: int, rg: float, smp: Sampling, word_map: dict[str, str]) -> list[Any]:
    from dco_train.sample import SampleSettings, rg_sample

    s = SampleSettings(prompt=prompt, cfg=smp.cfg, rg=rg, steps=smp.steps, seed=seed, width=world.SIZE, height=world.SIZE,
                       num_images=smp.images)
    return rg_sample(comps, s, word_map)


def read_samples(comps: Any, prompts: list[tuple[str, str, str]], seed: int, rg: float, smp: Sampling,
                 word_map: dict[str, str]) -> dict[str, float]:
    """Sample each (caption, asked background, asked position) on seed `seed + i` and read the images:
    the share showing the subject, its pattern, the style's stripes, and the asked background and position."""
    subj, pattern, stripes, prompt_ok = [], [], [], []
    for i, (caption, bg, pos) in enumerate(prompts):
        for im in sample(comps, caption, seed + i, rg, smp, word_map):
            r = read(im)
            subj.append(r.subject)
            pattern.append(r.pattern)
            stripes.append(r.stripes)
            prompt_ok.append(r.background == bg and r.position == pos)
    return {"subject": float(np.mean(subj)), "pattern": float(np.mean(pattern)), "style": float(np.mean(stripes)),
            "prompt": float(np.mean(prompt_ok))}


def subject_scores(comps: Any, rg: float, smp: Sampling, word_map: dict[str, str], prompts: int,
                   token: str = "<obj>") -> dict[str, float]:
    asked = [(world.Scene(world.SUBJECT_SHAPE, "subject", bg, pos).caption(token), bg, pos)
             for bg, pos in world.SUBJECT_NOVEL[:prompts]]
    scores = read_samples(comps, asked, smp.seed + 1000, rg, smp, word_map)
    return {k: scores[k] for k in ("subject", "pattern", "prompt")}


def drift_images(comps: Any, smp: Sampling, word_map: dict[str, str]) -> list[Any]:
    return [im for i, s in enumerate(DRIFT_SCENES) for im in sample(comps, s.caption(), smp.seed + 2000 + i, 0.0, smp, word_map)]


def drift_scores(images: list[Any], base: list[Any]) -> dict[str, float]:
    changed = [read(a).scene() != read(b).scene() for a, b in zip(images, base)]
    pixel = [np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() / 255 for a, b in zip(images, base)]
    return {"drift": float(np.mean(changed)), "pixel": float(np.mean(pixel))}


def train_run(prior: Path, data: Path, out: Path, method: Method | None, lr: float, steps: int, seed: int,
              style: bool = False) -> tuple[Path, Path | None, float]:
    from dco_train.config import TrainConfig
    from dco_train.train import RunOptions, train

    common = dict(data_dir=str(data), resolution=world.SIZE, max_train_steps=steps, rank=8, learning_rate=lr, seed=seed,
                  mixed_precision="no", checkpointing_steps=0, drift_every=0, gradient_checkpointing=False)
    if style:
        cfg = TrainConfig.style(dco_beta=method.beta if method else 1000.0, **common)
    else:
        tokens = {"<obj>": "square"} if method.ti else {}
        cfg = TrainConfig.subject(tokens=tokens, train_text_encoder_ti=method.ti, text_encoder_lr=lr,
                                  dco_beta=method.beta, **common)
    t0 = time.time()
    res = train(cfg, load_prior(prior), RunOptions(output_dir=out, progress_bar=False, log_with=None, cpu=True))
    return res.lora, res.embeddings if (method and method.ti and not style) else None, time.time() - t0


def adapted(prior: Path, loras: list[Path], embeddings: Path | None):
    from dco_train.sample import load_adapters

    comps = load_prior(prior)
    loaded = load_adapters(comps, [(p, 1.0) for p in loras], embeddings)
    return comps, loaded.word_map


def interpolate_at(front: list[dict[str, float]], key: str, level: float, fit: str = "subject") -> float:
    """`key` where the front (points sorted by `fit`) reaches fidelity `level`."""
    pts = sorted(front, key=lambda r: r[fit])
    for a, b in zip(pts, pts[1:]):
        if a[fit] <= level <= b[fit]:
            if b[fit] == a[fit]:
                return (a[key] + b[key]) / 2
            w = (level - a[fit]) / (b[fit] - a[fit])
            return a[key] + w * (b[key] - a[key])
    exact = [p[key] for p in pts if p[fit] == level]
    return float(np.mean(exact)) if exact else float("nan")


def matched_fit(rows: list[dict[str, Any]], say=print, fit: str = "subject",
                base: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """Each method's prompt fidelity and drift where its RG-0 learning-rate front reaches the highest
    `fit` fidelity that every front reaches (the fronts' common range). The base model, when given,
    starts every front: it is each method at learning rate 0."""
    say(f"# matched fit ({fit}): drift and prompt fidelity interpolated along each method's lr front (RG 0)")
    names = list(dict.fromkeys(r["method"] for r in rows))
    fronts = {n: [r for r in rows if r["method"] == n and r["rg"] == 0] + ([base] if base else []) for n in names}
    level = min(max(r[fit] for r in f) for f in fronts.values())
    if level < max(min(r[fit] for r in f) for f in fronts.values()):
        say(f"# the fronts share no range of {fit} fidelity: widen --lrs (nan below)")
    say(f"matched_{fit}_fidelity {level:.3f}")
    if level <= (base[fit] if base else 0.0):
        say(f"# some method's front never rises above the base model's {fit} fidelity: no matched comparison")
        return {}
    out = {}
    for name, f in fronts.items():
        out[name] = {k: interpolate_at(f, k, level, fit) for k in ("prompt", "drift", "pixel")}
        say(f"at_matched_fit {name} prompt {out[name]['prompt']:.3f} drift {out[name]['drift']:.3f} "
            f"pixel {out[name]['pixel']:.4f}")
    return out


FRONT_LEVELS = (0.125, 0.25, 0.375, 0.5, 0.625)


def family(method: str) -> str:
    """`db`, `db+ti`, `dco` or `dco+ti`: a method with its beta dropped, so that beta is one more knob of
    DCO's front (like lr and steps)."""
    return ("db" if method.startswith("db") else "dco") + ("+ti" if method.endswith("+ti") else "")


def point_name(r: dict[str, Any]) -> str:
    steps = f", {r['steps']} steps" if "steps" in r else ""
    return f"({r['method']}, lr {r['lr']:g}, RG {r['rg']:g}{steps})"


def best_at_fit(rows: list[dict[str, Any]], say=print, fit: str = "pattern", levels: tuple[float, ...] = FRONT_LEVELS,
                group=lambda r: r["method"], label: str = "front") -> dict[str, dict[float, dict[str, Any] | None]]:
    """Each group's front read at matched fit, without interpolation: at each `fit` level, the point of
    highest prompt fidelity among the group's points with at least that fit (None when none reaches it),
    and the lowest drift among them. Groups are methods over their lr x RG points by default (the
    paper's comparison: RG is a knob of the trade-off, like steps or lr), or method families at RG 0.
    A best of noisy points is biased upward, the more points the more so: confirm a front's point on
    independent samples (`--seed`, `--sample-seed`) before trusting it."""
    say(f"# {label}: best prompt fidelity, and lowest drift, among each group's points with {fit} >= level "
        "('-' = no point reaches it)")
    names = list(dict.fromkeys(group(r) for r in rows))
    out: dict[str, dict[float, dict[str, Any] | None]] = {n: {} for n in names}
    for level in levels:
        for n in names:
            pts = [r for r in rows if group(r) == n and r[fit] >= level - 1e-9]
            best = max(pts, key=lambda r: (r["prompt"], r[fit]), default=None)
            out[n][level] = best
            if best is None:
                say(f"{label}_{fit}>={level:g} {n} -")
                continue
            calm = min(pts, key=lambda r: (r["drift"], r["pixel"]))
            say(f"{label}_{fit}>={level:g} {n} prompt {best['prompt']:.3f} {point_name(best)} "
                f"drift {calm['drift']:.3f} {point_name(calm)}")
    return out


def read_fronts(rows: list[dict[str, Any]], say=print, base: dict[str, float] | None = None) -> None:
    """Every matched-fit reading of the rows: interpolated along RG-0 lr fronts, then the fronts' best points."""
    for fit in ("subject", "pattern"):
        matched_fit(rows, say, fit, base)
        best_at_fit(rows, say, fit)
        best_at_fit([r for r in rows if r["rg"] == 0], say, fit, group=lambda r: family(r["method"]), label="rg0_family")


@dataclass
class Results:
    rows: list[dict[str, Any]] = field(default_factory=list)
    merge: list[dict[str, Any]] = field(default_factory=list)
    base: dict[str, float] | None = None  # the untrained prior on the subject prompts (every front's origin)


def method_run(task: tuple) -> tuple[list[dict[str, Any]], Path, Path | None]:
    """One method at one learning rate: train, then score every RG scale (a worker process's job)."""
    prior, subject_dir, out, m, lr, args, base_drift = task
    torch.set_num_threads(args.threads)
    smp = Sampling(images=args.images, seed=args.sample_seed)
    lora, emb, secs = train_run(prior, subject_dir, out, m, lr, args.steps, args.seed)
    comps, wm = adapted(prior, [lora], emb)
    d = drift_scores(drift_images(comps, smp, wm), base_drift)
    rows = [{"method": m.name, "lr": lr, "steps": args.steps, "seed": args.seed, "sample_seed": args.sample_seed,
             "rg": rg,
             **subject_scores(comps, rg, smp, wm, args.prompts), **d, "train_s": secs} for rg in RGS]
    return rows, lora, emb


def run_all(args: argparse.Namespace, say=print) -> Results:
    torch.set_num_threads(args.threads)
    t_start = time.time()
    prior = build_prior(Recipe(**json.loads(args.recipe)), say=lambda m: say("# " + m))
    info = prior_info(prior)
    say(f"prior {prior}")
    say(f"prior_train_seconds vae {info['vae_seconds']} unet {info['unet_seconds']}")
    say("prior_held_out_accuracy " + " ".join(f"{k} {v:.3f}" for k, v in info["held_out_accuracy"].items()))
    say("prior_seen_accuracy " + " ".join(f"{k} {v:.3f}" for k, v in info["seen_accuracy"].items()))
    say("detector_accuracy " + " ".join(f"{k} {v:.3f}" for k, v in detector_accuracy().items()))
    base = load_prior(prior)
    codec = codec_accuracy(base.vae)
    say("codec_round_trip_accuracy " + " ".join(f"{k} {v:.3f}" for k, v in codec.items()))
    if min(codec.values()) < 0.9:
        say(f"# WARNING: the prior's VAE does not reconstruct the world (round trips read right {min(codec.values()):.0%} "
            "of the time), so every fidelity below measures a broken codec, not the methods.")
    root = Path(tempfile.mkdtemp(prefix="dco-quality-"))
    subject_dir = world.write_folder(root / "subject", world.subject_scenes(), token="<obj>")
    style_dir = world.write_folder(root / "style", [world.style_scene()])
    smp = Sampling(images=args.images, seed=args.sample_seed)
    base_drift = drift_images(base, smp, {})
    res = Results()
    res.base = {**subject_scores(base, 0.0, smp, {}, args.prompts, token="square"), "drift": 0.0, "pixel": 0.0}
    say(f"base model (the token's init word 'square'): subject {res.base['subject']:.3f} pattern {res.base['pattern']:.3f} "
        f"prompt {res.base['prompt']:.3f}")
    methods = [Method.parse(n) for n in args.methods.split(",")]
    say("method lr rg subject pattern prompt drift pixel train_s")
    loras: dict[tuple[str, float], tuple[Path, Path | None]] = {}
    tasks = [(prior, subject_dir, root / f"{m.name}-{lr:g}", m, lr, args, base_drift) for m in methods for lr in args.lrs]
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for (m, lr), (rows, lora, emb) in zip([(t[3], t[4]) for t in tasks], pool.map(method_run, tasks)):
            loras[(m.name, lr)] = (lora, emb)
            res.rows += rows
            for row in rows:
                say(f"{m.name} {lr:g} {row['rg']:g} {row['subject']:.3f} {row['pattern']:.3f} {row['prompt']:.3f} "
                    f"{row['drift']:.3f} {row['pixel']:.4f} {row['train_s']:.0f}")
    read_fronts(res.rows, say, res.base)
    skipped = [n for n in args.merge_methods.split(",") if n not in {m.name for m in methods}]
    if args.merge and skipped:
        say(f"# no merge for {', '.join(skipped)}: not in --methods")
    if args.merge:
        say("merge lr rg subject pattern style prompt")
        lr = max(args.lrs)
        for m in [x for x in methods if x.name in args.merge_methods.split(",")]:
            style = Method(m.name + "-style", m.beta, False)
            style_lora, _, _ = train_run(prior, style_dir, root / f"{style.name}-{lr:g}", style, lr, args.steps, args.seed,
                                         style=True)
            lora, emb = loras[(m.name, lr)]
            comps, wm = adapted(prior, [lora, style_lora], emb)
            for rg in MERGE_RGS:
                row = {"method": m.name, "lr": lr, "steps": args.steps, "seed": args.seed, "rg": rg,
                       **merge_scores(comps, wm, smp, rg)}
                res.merge.append(row)
                say(merge_line(row))
    say(f"total_seconds {time.time() - t_start:.0f}")
    if args.json:
        text = json.dumps({"rows": res.rows, "merge": res.merge, "base": res.base, "prior": info}, indent=1)
        atomic_write(args.json, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return res


def merge_scores(comps: Any, word_map: dict[str, str], smp: Sampling, rg: float) -> dict[str, float]:
    """The subject and the style LoRA loaded together, on the subject's novel prompts with the style asked too."""
    asked = [(p, *world.SUBJECT_NOVEL[i]) for i, p in enumerate(MERGE_PROMPTS)]
    return read_samples(comps, asked, smp.seed + 3000, rg, smp, word_map)


def merge_line(row: dict[str, Any]) -> str:
    return f"merge {row['method']} {row['lr']:g} {row.get('rg', 0.0):g} {row['subject']:.3f} {row['pattern']:.3f} {row['style']:.3f} {row['prompt']:.3f}"


SCORES = ("subject", "pattern", "prompt", "drift", "pixel")


def pool_seeds(rows: list[dict[str, Any]], say=print) -> list[dict[str, Any]]:
    """One row per (method, lr, steps, RG): the scores averaged over the runs' seeds (identical reruns
    counted once), with `seeds` (how many) and `<score>_range` (lowest and highest seed's value)."""
    unique = {tuple(r.get(k, 0) for k in ("method", "lr", "steps", "rg", "seed", "sample_seed")): r for r in rows}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in unique.values():
        groups.setdefault((r["method"], r["lr"], r.get("steps"), r["rg"]), []).append(r)
    pooled = []
    for g in groups.values():
        row = {**g[0], "seeds": len(g)}
        for k in SCORES:
            vals = [r[k] for r in g]
            row[k] = float(np.mean(vals))
            row[k + "_range"] = (min(vals), max(vals))
        pooled.append(row)
    if any(r["seeds"] > 1 for r in pooled):
        say("# pooled over seeds: method lr steps rg seeds, then each score as mean [lowest seed, highest seed]")
        for r in pooled:
            if r["seeds"] > 1:
                say(f"pooled {r['method']} {r['lr']:g} {r.get('steps')} {r['rg']:g} {r['seeds']} " + " ".join(
                    f"{k} {r[k]:.3f} [{r[k + '_range'][0]:.3f}, {r[k + '_range'][1]:.3f}]" for k in SCORES))
    return pooled


def from_json(paths: list[str], say=print, keep: dict[str, list] | None = None) -> Results:
    """The rows of earlier `--json` files, with the matched-fit comparison and merge table printed again.
    Runs of the same settings at other seeds are pooled first (`pool_seeds`); `keep` keeps only the rows
    whose values are in its lists (e.g. {"lr": [1e-3]})."""
    res = Results()
    bases = {}
    for path in paths:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        res.rows += [r for r in data["rows"] if all(r.get(k) in v for k, v in (keep or {}).items())]
        res.merge += data["merge"]
        if data.get("base"):  # one per set of sampling seeds (files of older runs lack the seed: keyed by value)
            seeds = {r.get("sample_seed") for r in data["rows"]} - {None}
            bases[min(seeds) if seeds else tuple(sorted(data["base"].items()))] = data["base"]
    res.rows = pool_seeds(res.rows, say)
    if bases:
        res.base = {k: float(np.mean([b[k] for b in bases.values()])) for k in next(iter(bases.values()))}
        say(f"base model over {len(bases)} sets of sampling seeds: "
            + " ".join(f"{k} {v:.3f}" for k, v in res.base.items()))
    read_fronts(res.rows, say, res.base)
    for row in res.merge:
        say(merge_line(row))
    return res


def pareto_plot(rows: list[dict[str, Any]], path: Path, fit: str = "subject", base: dict[str, float] | None = None) -> None:
    """`fit` fidelity (x) against prompt fidelity (y), one point per method x lr x RG scale; the base
    model (every front's origin) as a black square."""
    from PIL import Image, ImageDraw

    W, H, M = 520, 380, 48
    im = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(im)
    d.rectangle((M, 16, W - 140, H - M), outline=(80, 80, 80))
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (23, 190, 207), (127, 127, 127)]
    names = list(dict.fromkeys(r["method"] for r in rows))

    def xy(s: float, p: float) -> tuple[float, float]:
        return M + s * (W - 140 - M), H - M - p * (H - M - 16)

    for k in range(0, 11, 2):
        x, _ = xy(k / 10, 0)
        _, y = xy(0, k / 10)
        d.text((x - 8, H - M + 4), f"{k / 10:.1f}", fill=(60, 60, 60))
        d.text((M - 28, y - 6), f"{k / 10:.1f}", fill=(60, 60, 60))
    label = "subject fidelity (two-tone diamond present)" if fit == "subject" else "pattern fidelity (the two tones present)"
    seeds = max((r.get("seeds", 1) for r in rows), default=1)
    d.text((M + 60, H - 20), label + (f"; each point the mean of {seeds} seeds" if seeds > 1 else ""), fill=(0, 0, 0))
    d.text((4, 2), "prompt fidelity (background + position obeyed); dot size = RG 0,1,2,3,5", fill=(0, 0, 0))
    for i, name in enumerate(names):
        c = colours[i % len(colours)]
        for run in dict.fromkeys((r["lr"], r.get("steps")) for r in rows if r["method"] == name):
            run_rows = sorted((r for r in rows if r["method"] == name and (r["lr"], r.get("steps")) == run),
                              key=lambda r: r["rg"])
            pts = [xy(r[fit], r["prompt"]) for r in run_rows]
            d.line(pts, fill=c, width=1)
            for r, (x, y) in zip(run_rows, pts):
                rad = 2 + (RGS.index(r["rg"]) if r["rg"] in RGS else 0)
                d.ellipse((x - rad, y - rad, x + rad, y + rad), outline=c, width=2)
        d.rectangle((W - 130, 24 + 18 * i, W - 120, 34 + 18 * i), fill=c)
        d.text((W - 114, 22 + 18 * i), name, fill=(0, 0, 0))
    if base:
        x, y = xy(base[fit], base["prompt"])
        d.rectangle((x - 4, y - 4, x + 4, y + 4), fill=(0, 0, 0))
        d.rectangle((W - 130, 24 + 18 * len(names), W - 120, 34 + 18 * len(names)), fill=(0, 0, 0))
        d.text((W - 114, 22 + 18 * len(names)), "base model", fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: im.save(tmp, format="PNG", optimize=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", type=lambda s: [float(x) for x in s.split(",")], default=None,
                   help="learning rates, each method's front (default 3e-4,1e-3,3e-3); with --from-json: keep only these")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 300); with --from-json: keep only these")
    p.add_argument("--images", type=int, default=4, help="samples per prompt")
    p.add_argument("--prompts", type=int, default=6, help="novel subject prompts (of 6)")
    p.add_argument("--methods", default=None,
                   help="comma-separated: db, db+ti, dco<beta>, dco<beta>+ti (any beta > 0, e.g. dco50+ti); default: "
                        + ",".join(m.name for m in METHODS) + "; with --from-json: keep only these")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--sample-seed", dest="sample_seed", type=int, default=0,
                   help="offset of every sampling seed: rerun with another to check a point on independent samples")
    p.add_argument("--recipe", default="{}", help="prior recipe overrides as JSON (bench/world/prior.py Recipe)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (2 on 2 shared cores thrashed)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes that train and score the methods side by side")
    p.add_argument("--no-merge", dest="merge", action="store_false", help="skip the merge of subject and style LoRAs")
    p.add_argument("--merge-methods", dest="merge_methods", default="db+ti,dco50+ti",
                   help="the methods (of --methods) whose subject LoRA, at the largest of --lrs, is merged with a style LoRA "
                        "trained the same way")
    p.add_argument("--plot", default=str(HERE.parent / "docs" / "quality_pareto.png"),
                   help="the Pareto plot PNG to write (default: the README's docs/quality_pareto.png); \"\" for none")
    p.add_argument("--json", default=None, help="also write every row here")
    p.add_argument("--fit", choices=("subject", "pattern"), default="subject",
                   help="the plot's x axis: the whole subject (shape and tones) or only its two-tone pattern")
    p.add_argument("--from-json", dest="from_json", default=None,
                   help="comma-separated --json files of earlier runs (e.g. of methods split over processes): "
                        "analyse and plot their rows together instead of running")
    args = p.parse_args()
    keep = {"method": args.methods and args.methods.split(","), "lr": args.lrs,
            "steps": None if args.steps is None else [args.steps]}
    args.lrs = [3e-4, 1e-3, 3e-3] if args.lrs is None else args.lrs
    args.steps = 300 if args.steps is None else args.steps
    args.methods = args.methods or ",".join(m.name for m in METHODS)
    if args.steps < 1 or min(args.lrs, default=0) <= 0:
        p.error("--steps must be 1 or more and --lrs a comma-separated list of learning rates above 0.")
    if args.jobs < 1 or args.threads < 1:
        p.error("--jobs and --threads must be 1 or more.")
    try:
        [Method.parse(n) for n in args.methods.split(",")]
    except ValueError as e:
        p.error(f"--methods: {e}")
    for flag, out in (("--json", args.json), ("--plot", args.plot)):
        if out and not Path(out).resolve().parent.is_dir():
            p.error(f"{flag}: the folder of {out} does not exist; create it first (checked now, not after the run).")
    missing = [f for f in (args.from_json or "").split(",") if f and not Path(f).is_file()]
    if missing:
        p.error(f"--from-json: {', '.join(missing)} not found; give files that an earlier run wrote with --json.")
    if args.from_json:
        res = from_json(args.from_json.split(","), keep={k: v for k, v in keep.items() if v})
    else:
        res = run_all(args)
    if args.plot:
        pareto_plot(res.rows, Path(args.plot), args.fit, res.base)
        print(f"plot {args.plot}")


if __name__ == "__main__":
    main()
