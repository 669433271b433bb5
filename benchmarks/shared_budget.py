"""The shared baseline's own budget: an early stop chosen on validation noise.

    python benchmarks/shared_budget.py -S finetune.steps=1500 --every 750
    python benchmarks/shared_budget.py --every 100 --samples 4000     # the default budget, quicker

Run in the workspace after ``make repro`` (it reads data/prepared,
models/classifier and models/pretrained). Trains the shared fine-tune
exactly as the ``finetune_shared`` stage does (the same function, params,
seed and data) for its full budget (``finetune.shared_steps`` or N x
``finetune.steps``) and scores the EMA weights every ``--every`` steps, the
pretrained model as step 0: FD against the train split, the held-out loss
and the memorised fraction, all on **validation noise** (the noise
``evaluate.seed = --val-seed`` gives, never the test noise of
``evaluate.seed``). The step with the lowest validation FD is the early
stop; since the learning rate is constant, ``-S finetune.shared_steps=<it>``
makes the pipeline train exactly that snapshot
(tests/test_train.py::test_a_shorter_run_is_the_snapshot_of_a_longer_one_at_a_constant_lr).
Writes ``docs/results/shared_budget.json`` and a figure beside the docs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dtm_core import data as data_mod  # noqa: E402
from dtm_core import distances, features  # noqa: E402
from dtm_core.config import ConfigError, Params, load_params, parse_params  # noqa: E402
from dtm_core.denoising import heldout_losses  # noqa: E402
from dtm_core.errors import DtmError  # noqa: E402
from dtm_core.io import write_json  # noqa: E402
from dtm_core.plots import save_figure  # noqa: E402
from dtm_core.sampling import initial_noise, sample  # noqa: E402
from dtm_core.seeding import derive_seed  # noqa: E402
from dtm_core.tracking import git_commit  # noqa: E402
from stages.common import CLASSIFIER_DIR, DATA_DIR, load_reference  # noqa: E402
from stages.evaluate import noise_seed  # noqa: E402
from stages.finetune import load_inputs  # noqa: E402
from stages.finetune_shared import train_shared  # noqa: E402
from tools.exps import apply_overrides  # noqa: E402
from tools.seeds import parse_sets  # noqa: E402


def with_overrides(raw: dict, sets: list[str]) -> dict:
    """params.yaml's dict with ``key=value`` overrides, read (and refused) as the tools read ``-S``
    (tools.seeds.parse_sets)."""
    return apply_overrides(raw, parse_sets(sets))


def choose(rows: list[dict]) -> dict:
    """The early stop: the fine-tuned snapshot (step >= 1) with the lowest validation FD."""
    tuned = [r for r in rows if r["step"] > 0]
    if not tuned:
        raise ValueError("no fine-tuned snapshot was scored: --every must not exceed the budget")
    return min(tuned, key=lambda r: (r["fd"], r["step"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-S", "--set", action="append", default=[], help="key=value on top of params.yaml")
    ap.add_argument("--every", type=int, default=750, help="score the EMA weights every this many steps")
    ap.add_argument("--val-seed", type=int, default=1, help="evaluate.seed of the validation noise")
    ap.add_argument("--samples", type=int, default=None, help="default: evaluate.num_samples")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "shared_budget.json")
    ap.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "shared_budget.png")
    args = ap.parse_args()
    torch.set_num_threads(2)
    params = parse_params(with_overrides(load_params().model_dump(mode="json"), args.set), "params.yaml")
    if args.val_seed == params.evaluate.seed:
        raise ConfigError(f"--val-seed {args.val_seed} is evaluate.seed, the test noise: choose another")
    if params.finetune.lr_schedule != "constant":
        raise ConfigError(f"finetune.lr_schedule is '{params.finetune.lr_schedule}': a shorter run is then not a "
                          "snapshot of the longer one, so the early stop could not be trained by "
                          "finetune.shared_steps; set finetune.lr_schedule=constant")
    val = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"seed": args.val_seed})})
    budget = params.finetune.shared_total_steps(params.num_ranges)
    rows = score_snapshots(params, val, budget, args.every, args.samples or params.evaluate.num_samples)
    best = choose(rows)
    ev = val.evaluate
    result = {
        "git_commit": git_commit(), "overrides": args.set, "budget": budget, "every": args.every,
        "deme_total_steps": params.num_ranges * params.finetune.steps,
        "shared_lr": params.finetune.shared.lr, "seed": params.seed,
        "validation": {"evaluate_seed": args.val_seed, "num_samples": args.samples or ev.num_samples,
                       "sampler": ev.sampler, "sampling_steps": ev.sampling_steps},
        "chosen_steps": best["step"], "rows": rows,
    }
    write_json(args.out, result)
    plot(rows, best["step"], args.figure)
    print(f"early stop at {best['step']} steps (validation FD {best['fd']:.4f}; base {rows[0]['fd']:.4f}); "
          f"wrote {args.out} and {args.figure}")
    return 0


def score_snapshots(params: Params, val: Params, budget: int, every: int, num_samples: int) -> list[dict]:
    ev = val.evaluate
    images, base, scheduler = load_inputs()
    clf = features.load_classifier(CLASSIFIER_DIR / "classifier")
    ref = load_reference(ev.features)
    extract = features.feature_extractor(ev.features, clf, ev.inception_dir)
    held = data_mod.load_split(DATA_DIR, "heldout")
    train_images = data_mod.load_split(DATA_DIR, "train").images
    cfg = base.config
    noise = initial_noise(noise_seed(val, 0), num_samples, (cfg.in_channels, cfg.sample_size, cfg.sample_size))
    rows: list[dict] = []
    start = time.time()

    def score(step: int, model) -> None:
        model.eval()
        out = sample([model], scheduler, noise, ev.sampling_steps, eta=ev.eta, sampler=ev.sampler,
                     batch_size=ev.batch_size, seed=derive_seed(ev.seed, "evaluate-eta-0"), desc=f"step {step}")
        feats = extract(out)
        losses = heldout_losses(val.evaluate, [model], None, scheduler, held.images)["losses"]
        row = {
            "step": step,
            "fd": distances.frechet_distance(feats, ref["train"]),
            "heldout_loss": float(np.mean(losses)),
            "memorised_fraction": distances.memorisation(out, held.images, train_images,
                                                         ev.memorisation_percentile)["memorised_fraction"],
            "seconds": round(time.time() - start, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    score(0, base)
    train_shared(params, images, base, scheduler, budget, snapshot_every=every, on_snapshot=score)
    return rows


def plot(rows: list[dict], chosen: int, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(12.0, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, key, title in zip(axes, ("fd", "heldout_loss", "memorised_fraction"),
                              ("validation FD (step 0: the base)", "held-out eps-MSE", "memorised fraction")):
        ax.plot(steps, [r[key] for r in rows], "o-", markersize=3)
        ax.axhline(rows[0][key], color="gray", linestyle=":", linewidth=1)
        ax.axvline(chosen, color="tab:red", linestyle="--", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("shared fine-tune step")
    save_figure(fig, path)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DtmError as exc:  # bad params or missing pipeline outputs: the message names the key or file
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
