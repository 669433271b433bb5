"""Regenerate a shipped base checkpoint with this project's own training code: ``make base``, ``make base-fashion``.

    python -m tools.make_base                 # params.yaml's recipe -> base/digits-unet/
    python -m tools.make_base --check         # retrain in a scratch dir and compare bit for bit
    python -m tools.make_base --config configs/fashion.yaml --until-plateau   # -> base/fashion-unet/

The recipe is params.yaml (``--config``'s keys on top) with
``model.pretrained_path: null``. Without ``--until-plateau``, ``stages.prepare``
and ``stages.pretrain`` run in a scratch directory as DVC would run them, and
the trained model is copied into place atomically: CPU training is
deterministic, so on the same kind of machine the result is bit-identical.

With ``--until-plateau`` it trains as DDPM was trained (the recipe's constant
lr after warm-up, EMA) until the validation loss improves by less than
``--tolerance`` over ``--every`` steps: after each chunk the EMA weights are
scored on the validation split (fixed images, timesteps and noise) and
written to ``<out>``, the curve to ``<out>.state/plateau.json``. The
resumable state lives in ``<out>.state/``: a stopped run continues there.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import yaml

from dtm_core.io import atomic_dir, dir_digest
from dtm_core.tracking import repo_root, tracking_uri

OUT = Path("base/digits-unet")


def recipe_params(params: dict, config: Optional[dict] = None) -> dict:
    """params.yaml (``config`` on top) as a base is trained from it: no checkpoint to import, its own MLflow
    experiment."""
    from dtm_core.config import overlay

    out = overlay(params, config)
    out["model"] = {**out["model"], "pretrained_path": None}
    out["tracking"] = {**out["tracking"], "experiment_name": out["tracking"]["experiment_name"] + "-base",
                       "register_model": None}
    return out


def train_base(workdir: Path, params: dict) -> Path:
    """Run prepare + pretrain with ``params`` in ``workdir``; the trained model's directory."""
    root = repo_root()
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
           "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri()}
    for stage in ("prepare", "pretrain"):
        proc = subprocess.run([os.path.abspath(sys.executable), "-m", f"stages.{stage}"], cwd=workdir, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"make_base: stage {stage} failed (exit {proc.returncode})")
    return workdir / "models" / "pretrained"


class Plateau(Exception):
    """Raised from the snapshot callback to end training once the validation loss has levelled off."""


def plateaued(rows: list[dict], tolerance: float) -> bool:
    """The last chunk improved the validation loss by less than ``tolerance`` (relative)."""
    if len(rows) < 2:
        return False
    prev, cur = rows[-2]["val_loss"], rows[-1]["val_loss"]
    return (prev - cur) / prev < tolerance


def plot_plateau(rows: list[dict], tolerance: float, path: Path) -> None:
    """Validation loss by step, each chunk's relative improvement beside it against the stopping tolerance."""
    from dtm_core.plots import new_figure, save_figure

    fig, ax = new_figure(7.0, 3.5)
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["val_loss"] for r in rows], "o-", markersize=3)
    ax.set(xlabel="pretraining step", ylabel="validation eps-MSE (EMA weights)",
           title="base model: validation loss to its plateau")
    gains = ax.twinx()
    gains.plot(steps[1:], [100 * (a["val_loss"] - b["val_loss"]) / a["val_loss"] for a, b in zip(rows, rows[1:])],
               "s:", color="gray", markersize=3)
    gains.axhline(100 * tolerance, color="gray", linewidth=0.8)
    gains.set_ylabel("improvement per chunk, % (line: the stop)")
    save_figure(fig, path)


def train_until_plateau(params: dict, out: Path, every: int, tolerance: float, val_images: int) -> list[dict]:
    import time

    import torch

    from dtm_core import data as data_mod
    from dtm_core.config import parse_params
    from dtm_core.denoising import denoising_losses, timestep_grid
    from dtm_core.io import read_json, write_json
    from dtm_core.model import build_scheduler, build_unet, save_model
    from dtm_core.seeding import derive_seed
    from dtm_core.train import train

    p = parse_params(params)
    state = Path(f"{out}.state")
    curve_file = state / "plateau.json"
    curve = read_json(curve_file) if curve_file.is_file() else {}
    rows: list[dict] = curve.get("rows", [])
    if curve.get("plateau"):
        print(f"{out} already reached its plateau (step {rows[-1]['step']})")
        return rows
    train_ds, val = data_mod.split(data_mod.load_source(p.data), p.data.holdout_fraction,
                                   derive_seed(p.data.split_seed, "prepare"))
    val_x = val.images[:val_images]
    scheduler = build_scheduler(p.model)
    grid = timestep_grid(p.model.num_train_timesteps, p.evaluate.heldout_timesteps)
    recipe = {k: v for k, v in p.model_dump(mode="json").items() if k in ("seed", "data", "model", "pretrain")}
    clock = {"start": time.perf_counter(), "base": rows[-1]["seconds"] if rows else 0.0}

    def score(step: int, model) -> None:
        loss = float(denoising_losses([model], scheduler, val_x, grid, derive_seed(p.evaluate.seed, "heldout"),
                                      batch_size=p.evaluate.batch_size, desc=f"validation loss @{step}").mean())
        rows[:] = [r for r in rows if r["step"] < step]
        rows.append({"step": step, "val_loss": loss,
                     "seconds": clock["base"] + time.perf_counter() - clock["start"]})
        done = plateaued(rows, tolerance)
        info = {"source": "embedded", "steps": step, "val_loss": loss, "plateau": done}
        save_model(model, scheduler, out, info)
        write_json(curve_file, {"recipe": recipe, "every": every, "tolerance": tolerance,
                                "validation_images": len(val_x), "plateau": done, "rows": rows})
        plot_plateau(rows, tolerance, state / "plateau.png")
        print(f"step {step}: validation loss {loss:.5f}", flush=True)
        if done:
            raise Plateau

    torch.manual_seed(derive_seed(p.seed, "pretrain-init"))
    unet = build_unet(p.model, sample_size=p.data.image_size, channels=p.data.channels)
    try:
        train(unet, scheduler, torch.as_tensor(train_ds.images), p.pretrain, seed=derive_seed(p.seed, "pretrain"),
              checkpoint_dir=state / "checkpoints", checkpoint_every=every, snapshot_every=every,
              on_snapshot=score, desc="pretrain (until plateau)")
    except Plateau:
        shutil.rmtree(state / "checkpoints", ignore_errors=True)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.make_base", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, help="a configuration whose keys replace params.yaml's")
    ap.add_argument("--out", type=Path, help="default: base/digits-unet, or model.pretrained_path of --config")
    ap.add_argument("--check", action="store_true", help="retrain and compare with --out, changing nothing")
    ap.add_argument("--until-plateau", action="store_true", help="train in resumable chunks to a plateau")
    ap.add_argument("--every", type=int, default=2000, help="steps per chunk (--until-plateau)")
    ap.add_argument("--tolerance", type=float, default=0.005, help="relative improvement per chunk that ends it")
    ap.add_argument("--val-images", type=int, default=2000, help="validation images scored per chunk")
    args = ap.parse_args(argv)
    over = yaml.safe_load(args.config.read_text()) if args.config else {}
    params = recipe_params(yaml.safe_load((repo_root() / "params.yaml").read_text()), over)
    if args.out is None:
        args.out = Path((over.get("model") or {}).get("pretrained_path") or OUT)
    if args.until_plateau:
        rows = train_until_plateau(params, args.out, args.every, args.tolerance, args.val_images)
        print(f"wrote {args.out} at step {rows[-1]['step'] if rows else 0}")
        return 0
    with tempfile.TemporaryDirectory(prefix="make-base-") as tmp:
        trained = train_base(Path(tmp), params)
        digest = dir_digest(trained)
        if args.check:
            shipped = dir_digest(args.out) if args.out.is_dir() else None
            print(f"retrained {digest}\nshipped   {shipped}")
            return 0 if digest == shipped else 1
        with atomic_dir(args.out) as dest:
            shutil.copytree(trained, dest, dirs_exist_ok=True)
    print(f"wrote {args.out} (content digest {digest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
