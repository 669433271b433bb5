"""Regenerate the shipped base checkpoint with this project's own pretrain stage: ``make base``.

    python -m tools.make_base                 # params.yaml's recipe -> base/digits-unet/
    python -m tools.make_base --check         # retrain in a scratch dir and compare bit for bit

The recipe is params.yaml itself (seed, data, model, pretrain) with
``model.pretrained_path: null``: the command writes that into a scratch
directory, runs ``python -m stages.prepare`` and ``python -m stages.pretrain``
there exactly as DVC would, and copies the trained ``models/pretrained`` into
place atomically. Training on the CPU is deterministic, so on the same kind of
machine the result is bit-identical (``--check`` verifies that without
touching the shipped copy). The stage runs log to the repository's MLflow
store, experiment ``<experiment_name>-base``.
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


def recipe_params(params: dict) -> dict:
    """params.yaml as the base is trained from it: no checkpoint to import, its own MLflow experiment."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in params.items()}
    out["model"] = {**out["model"], "pretrained_path": None}
    out["tracking"] = {**out["tracking"], "experiment_name": out["tracking"]["experiment_name"] + "-base",
                       "register_model": None}
    return out


def train_base(workdir: Path) -> Path:
    """Run prepare + pretrain with the recipe in ``workdir``; the trained model's directory."""
    root = repo_root()
    params = recipe_params(yaml.safe_load((root / "params.yaml").read_text()))
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
           "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri()}
    for stage in ("prepare", "pretrain"):
        proc = subprocess.run([os.path.abspath(sys.executable), "-m", f"stages.{stage}"], cwd=workdir, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"make_base: stage {stage} failed (exit {proc.returncode})")
    return workdir / "models" / "pretrained"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.make_base", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--check", action="store_true", help="retrain and compare with --out, changing nothing")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="make-base-") as tmp:
        trained = train_base(Path(tmp))
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
