"""The base model's plateau: FD, held-out loss and memorisation against pretraining steps.

    python benchmarks/base_convergence.py                 # params.yaml's recipe, as `make base` trains it
    python benchmarks/base_convergence.py --every 2000 --samples 4000

Trains the shipped base model's recipe exactly as ``make base`` does (same
params, seeds and data split; the snapshots draw no random numbers from the
training streams, so the last snapshot *is* the shipped checkpoint) and
scores the EMA weights every ``--every`` steps: FD against the train split
in the feature classifier's space (``--samples`` samples, DDIM ``--ddim``
steps, fixed noise), the held-out and train eps-MSE on a fixed timestep grid
with fixed noise, and the memorised fraction. Writes
``docs/results/base_convergence.json`` and ``docs/figures/base_convergence.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dtm_core import data as data_mod  # noqa: E402
from dtm_core import distances, features  # noqa: E402
from dtm_core.config import parse_params  # noqa: E402
from dtm_core.denoising import denoising_losses, timestep_grid  # noqa: E402
from dtm_core.io import file_digest, write_json  # noqa: E402
from dtm_core.model import build_scheduler, build_unet, save_model  # noqa: E402
from dtm_core.plots import save_figure  # noqa: E402
from dtm_core.sampling import initial_noise, sample  # noqa: E402
from dtm_core.seeding import derive_seed  # noqa: E402
from dtm_core.tracking import git_commit  # noqa: E402
from dtm_core.train import train  # noqa: E402
from tools.make_base import recipe_params  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--every", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--ddim", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "base_convergence.json")
    ap.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "base_convergence.png")
    args = ap.parse_args()
    torch.set_num_threads(2)
    params = parse_params(recipe_params(yaml.safe_load((ROOT / "params.yaml").read_text())))
    ev = params.evaluate
    dataset = data_mod.load_source(params.data)
    train_ds, held = data_mod.split(dataset, params.data.holdout_fraction,
                                    derive_seed(params.data.split_seed, "prepare"))
    clf = features.train_classifier(train_ds.images, train_ds.labels, held.images, held.labels,
                                    len(dataset.classes), ev.classifier, derive_seed(ev.classifier.seed, "classifier"))
    ref = features.extract_features(clf.model, train_ds.images)
    held_feats = features.extract_features(clf.model, held.images)
    scheduler = build_scheduler(params.model)
    grid = timestep_grid(params.model.num_train_timesteps, ev.heldout_timesteps)
    noise = initial_noise(derive_seed(ev.seed, "convergence"), args.samples, train_ds.images.shape[1:])
    train_probe = train_ds.images[: len(held.images)]
    rows: list[dict] = []
    start = time.time()

    def score(step: int, model) -> None:
        images = sample([model], scheduler, noise, args.ddim, batch_size=ev.batch_size, desc=f"step {step}")
        feats = features.extract_features(clf.model, images)
        seed = derive_seed(ev.seed, "heldout")
        row = {
            "step": step,
            "fd": distances.frechet_distance(feats, ref),
            "heldout_loss": float(denoising_losses([model], scheduler, held.images, grid, seed).mean()),
            "train_loss": float(denoising_losses([model], scheduler, train_probe, grid, seed).mean()),
            "memorised_fraction": distances.memorisation(images, held.images, train_ds.images,
                                                         ev.memorisation_percentile)["memorised_fraction"],
            "memorised_fraction_features": distances.memorisation(feats, held_feats, ref,
                                                                  ev.memorisation_percentile)["memorised_fraction"],
            "seconds": time.time() - start,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    torch.manual_seed(derive_seed(params.seed, "pretrain-init"))  # as stages/pretrain.py does
    shape = train_ds.images.shape[1:]
    unet = build_unet(params.model, sample_size=shape[-1], channels=shape[0])
    res = train(unet, scheduler, torch.as_tensor(train_ds.images), params.pretrain,
                seed=derive_seed(params.seed, "pretrain"), snapshot_every=args.every, on_snapshot=score,
                desc="pretrain (convergence)", channels_last=False)  # the shipped base's layout, as pretrain
    final = Path("/tmp/base-convergence-final")
    save_model(res.model, scheduler, final, {"source": "embedded", "steps": res.steps})
    recipe = {k: v for k, v in params.model_dump(mode="json").items() if k in ("seed", "data", "model", "pretrain")}
    result = {"git_commit": git_commit(), "recipe": recipe, "samples": args.samples, "ddim_steps": args.ddim,
              "classifier_heldout_accuracy": clf.heldout_accuracy, "heldout_images": len(held.images),
              "final_weights_sha256": file_digest(final / "diffusion_pytorch_model.safetensors"), "rows": rows}
    write_json(args.out, result)
    plot(rows, args.figure)
    print(f"wrote {args.out} and {args.figure}")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows]
    fig = Figure(figsize=(12.0, 3.6))
    FigureCanvasAgg(fig)
    ax_fd, ax_loss, ax_mem = fig.subplots(1, 3)
    ax_fd.plot(steps, [r["fd"] for r in rows], "o-", markersize=3)
    ax_fd.set_title("FD to the train split (classifier features)")
    ax_loss.plot(steps, [r["heldout_loss"] for r in rows], "o-", markersize=3, label="held-out")
    ax_loss.plot(steps, [r["train_loss"] for r in rows], "o-", markersize=3, label="train")
    ax_loss.set_title("eps-MSE, fixed timesteps and noise")
    ax_loss.legend(fontsize=8)
    ax_mem.plot(steps, [r["memorised_fraction"] for r in rows], "o-", markersize=3, label="pixels")
    ax_mem.plot(steps, [r["memorised_fraction_features"] for r in rows], "o-", markersize=3, label="features")
    ax_mem.axhline(0.05, color="gray", linestyle=":", linewidth=1)
    ax_mem.set_title("memorised fraction (0.05: like fresh data)")
    ax_mem.legend(fontsize=8)
    for ax in (ax_fd, ax_loss, ax_mem):
        ax.set_xlabel("pretraining step")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
