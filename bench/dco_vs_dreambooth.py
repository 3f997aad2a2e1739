"""DCO (beta = 1000) against the plain diffusion loss (DreamBooth-LoRA, beta <= 0) on the same data.

    python bench/dco_vs_dreambooth.py [--steps 200] [--lr 1e-3]

Both runs use the same tiny random-weight model, data (the demo's synthetic subject), seeds and
steps. It prints the final `fit` (training-caption error at fixed noises; lower = the subject is
learned) and `drift` (how far the model moved on held-out prompts; lower = closer to the pretrained
model) of each.

At equal steps the two runs do not reach the same fit (`fit_gain_dco_over_db` says how much of
DreamBooth's fit gain DCO reached), so `drift_dco_over_db` at equal steps compares a run that
moved less with one that moved more; it is not the paper's claim. The claim is about equal fit:
`drift_db_at_dco_fit` reads DreamBooth's drift where its own trajectory (the drift meter's
readings every `steps/10` steps) first reached DCO's final fit, linearly interpolated between
readings, and `drift_dco_over_db_at_matched_fit` is DCO's final drift over that (below 1: DCO
drifted less for the same fit). It prints `nan` when DreamBooth never got as far as DCO. On random
weights this measures the mechanism only; bench/quality.py measures it on a model with a learned
prior.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dco_train.config import TrainConfig  # noqa: E402
from dco_train.demo import make_datasets  # noqa: E402
from dco_train.tiny import build_tiny_sdxl  # noqa: E402
from dco_train.train import RunOptions, train  # noqa: E402


def drift_at_fit(trajectory: list[tuple[float, float]], fit: float) -> float:
    """The drift where a run's (fit, drift) readings first reach `fit` (lower fit = better),
    interpolated linearly between the two readings around it; nan if the run never got there."""
    for (f0, d0), (f1, d1) in zip(trajectory, trajectory[1:]):
        if f1 <= fit <= f0 and f0 != f1:
            return d0 + (d1 - d0) * (f0 - fit) / (f0 - f1)
    if trajectory and trajectory[0][0] <= fit:
        return trajectory[0][1]
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3, help="LoRA and token learning rate (toy model)")
    p.add_argument("--beta", type=float, default=1000.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dco-vs-db-"))
    subject, _ = make_datasets(root)
    results = {}
    for name, beta in (("dco", args.beta), ("db", 0.0)):
        cfg = TrainConfig.subject(
            data_dir=str(subject), tokens={"<obj>": "star"}, resolution=64, max_train_steps=args.steps, rank=8,
            learning_rate=args.lr, text_encoder_lr=args.lr, dco_beta=beta, seed=args.seed, mixed_precision="no",
            checkpointing_steps=0, drift_every=max(1, args.steps // 10),
        )
        res = train(cfg, build_tiny_sdxl(seed=0, tokenizer_dir=root / "tok"),
                    RunOptions(output_dir=root / name, progress_bar=False, log_with=None))
        monitor = [h for h in res.history if "drift" in h]
        results[name] = monitor[-1]
        results[name + "_trajectory"] = [(h["fit"], h["drift"]) for h in monitor]
        results[name + "_start_fit"] = monitor[0]["fit"]
        steps = [h for h in res.history if "loss" in h]
        step_s = steps[-1]["elapsed_s"] / len(steps)
        measures = [h["drift_s"] for h in monitor if "drift_s" in h]
        results[name + "_meter_cost"] = (sum(measures) / len(measures)) / (200 * step_s)  # at the default cadence
    print(f"steps {args.steps} lr {args.lr} beta {args.beta}", file=sys.stderr)
    print(f"fit_start {results['dco_start_fit']:.6f}")
    for name in ("dco", "db"):
        print(f"fit_{name} {results[name]['fit']:.6f}")
        print(f"drift_{name} {results[name]['drift']:.6g}")
    print(f"drift_dco_over_db {results['dco']['drift'] / results['db']['drift']:.3f}")
    gain = lambda n: results["dco_start_fit"] - results[n]["fit"]  # noqa: E731
    print(f"fit_gain_dco_over_db {gain('dco') / gain('db'):.3f}" if gain("db") else "fit_gain_dco_over_db nan")
    for name in ("dco", "db"):  # drift paid per unit of fit gained: lower = more fit for less drift
        print(f"drift_per_fit_gain_{name} {results[name]['drift'] / gain(name):.3f}" if gain(name) > 0 else
              f"drift_per_fit_gain_{name} nan")
    db_drift = drift_at_fit(results["db_trajectory"], results["dco"]["fit"])
    print(f"drift_db_at_dco_fit {db_drift:.6g}")
    print(f"drift_dco_over_db_at_matched_fit {results['dco']['drift'] / db_drift:.3f}" if db_drift == db_drift and db_drift
          else "drift_dco_over_db_at_matched_fit nan")
    print(f"meter_cost_fraction_at_default_every_200 {results['dco_meter_cost']:.4f}")


if __name__ == "__main__":
    main()
