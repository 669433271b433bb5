"""DVC stage controls: the models that separate decoupling from averaging -> controls/ and metrics/controls.json.

``controls.models`` names which to build (docs/FASHION.md); the digits
default names none and the stage writes an empty report.

- shared_consistency: the shared fine-tune (its lr, N x the per-range steps)
  with DeMe's consistency loss to the frozen base.
- soup: N fine-tunes over all of [0, T) with DeMe's recipe (per-range steps
  and lr, probabilistic sampling over the whole range, consistency loss,
  channel projection), each from its own seed, merged exactly as the range
  models are (merge/weights.json, merge.method, density, scale).
- shared_scaled: theta + lambda * tau_shared, lambda from controls.scales.
- merged_scaled: DeMe's merge with merge.scale from controls.scales.

The scales are chosen by FD on validation noise (their own seed) against
the held-out split (train where the source has no test split). Each control
is then evaluated as evaluate@<model> evaluates (same test noise, same
held-out images) and contrasted with DeMe's merge by a paired bootstrap.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from dtm_core import adapters, distances, features
from dtm_core.config import Params
from dtm_core.io import atomic_dir, atomic_file, read_json, write_json
from dtm_core.model import float_state, load_unet, save_model
from dtm_core.partition import load_partition, sample_timesteps
from dtm_core.sampling import initial_noise, state_scorer
from dtm_core.seeding import derive_seed
from dtm_core.task_vector import TaskVector
from dtm_core.tracking import NullRun
from dtm_core.train import train
from stages.common import (
    CLASSIFIER_DIR,
    PARTITION_FILE,
    PRETRAINED_DIR,
    SAMPLES_DIR,
    SHARED_DIR,
    WEIGHTS_FILE,
    load_reference,
    main,
    read_npz,
    reference_split,
    validation_reference,
)
from stages.evaluate import score_models
from stages.finetune import load_inputs, trainee
from stages.merge import merge_inputs, merged_state

CONTROLS_DIR = Path("controls")
# (model, control) pairs contrasted: each control against the DeMe merge built like it
CONTRASTS = (("merged", "soup"), ("merged_scaled", "shared_scaled"), ("merged", "shared_consistency"),
             ("merged_scaled", "merged"))


def train_shared_consistency(params: Params, images, base, scheduler):
    ft = params.finetune.shared
    student = trainee(load_unet(PRETRAINED_DIR, what="pretrained model"), ft, projection=False)
    return adapters.fold(train(
        student, scheduler, images, ft, seed=derive_seed(params.seed, "control-shared-consistency"),
        steps=ft.shared_total_steps(params.num_ranges), teacher=base,
        consistency_weight=params.finetune.consistency_weight, desc="control shared_consistency").model)


def train_soup(params: Params, images, base, scheduler, T: int) -> list:
    """N DeMe fine-tunes over all of [0, T), each with the per-range budget and a seed of its own."""
    ft = params.finetune

    def draw(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return sample_timesteps(batch_size, 0, T, T, ft.p, generator, ft.antithetic)[0]

    return [adapters.fold(train(trainee(base, ft, ft.channel_projection), scheduler, images, ft,
                                seed=derive_seed(params.seed, f"control-soup-{i}"), timestep_sampler=draw,
                                teacher=base, consistency_weight=ft.consistency_weight,
                                desc=f"control soup {i}").model)
            for i in range(params.num_ranges)]


def validation_fd(params: Params, template, scheduler, score_images):
    """``score(state)``: FD of ``template`` with ``state`` on the controls' validation noise (its own seed)."""
    cfg = template.config
    noise = initial_noise(derive_seed(params.evaluate.seed, "controls-validation"), params.controls.num_samples,
                          (cfg.in_channels, cfg.sample_size, cfg.sample_size))
    return state_scorer(template, scheduler, noise, params.evaluate.sampling_steps, params.evaluate.sampler,
                        params.evaluate.batch_size, score_images)


def choose_scale(score, state_at, scales: list[float]) -> dict:
    """The scale of lowest validation FD (the first on a tie) and every candidate's score."""
    rows = [{"scale": s, "validation_fd": score(state_at(s))} for s in scales]
    return {"chosen": min(rows, key=lambda r: r["validation_fd"])["scale"], "candidates": rows}


def controls(params: Params, run=NullRun()) -> dict:
    names = params.controls.models
    ranges, T = load_partition(PARTITION_FILE)
    record: dict = {"models": list(names), "scales": {}, "contrasts": {}}
    with atomic_dir(CONTROLS_DIR) as out:
        if names:
            record.update(build_and_evaluate(params, run, names, ranges, T, out))
        write_json(out / "controls.json", record)
        with atomic_file(out / "controls.md") as handle:
            handle.write(render(record))
    return {key: c["fd"] for key, c in record["contrasts"].items()}


def build_and_evaluate(params: Params, run, names, ranges, T: int, out: Path) -> dict:
    images, base, scheduler = load_inputs()
    ref = load_reference()
    clf = features.load_classifier(CLASSIFIER_DIR / "classifier")
    val_ref = validation_reference(ref)

    def score_images(samples) -> float:
        return distances.frechet_distance(features.extract_features(clf, samples), val_ref)

    models: dict = {}
    scales: dict = {}
    if "shared_consistency" in names:
        models["shared_consistency"] = train_shared_consistency(params, images, base, scheduler)
    template, theta, files = merge_inputs(len(ranges))
    weights = read_json(WEIGHTS_FILE, "merge weights")["weights"]
    if "soup" in names:
        soup_files = []
        (out / "task_vectors").mkdir(parents=True, exist_ok=True)
        for i, member in enumerate(train_soup(params, images, base, scheduler, T)):
            soup_files.append(out / "task_vectors" / f"soup-{i}.safetensors")
            TaskVector.from_states(theta, float_state(member), what=f"soup member {i}").save(soup_files[-1])
        models["soup"] = _with_state(template, merged_state(params, theta, soup_files, weights))
    if "merged_scaled" in names:
        score = validation_fd(params, template, scheduler, score_images)  # loads each candidate into the template
        mc = params.merge

        def merged_at(s: float) -> dict:
            return merged_state(params.model_copy(update={"merge": mc.model_copy(update={"scale": s})}), theta,
                                files, weights)

        scales["merged_scaled"] = choose_scale(score, merged_at, params.controls.scales)
        models["merged_scaled"] = _with_state(template, merged_at(scales["merged_scaled"]["chosen"]))
    if "shared_scaled" in names:
        shared = load_unet(SHARED_DIR, what="shared model")
        theta_plain = float_state(load_unet(PRETRAINED_DIR, what="pretrained model"))
        tau = TaskVector.from_states(theta_plain, float_state(shared), what="shared model")
        score = validation_fd(params, shared, scheduler, score_images)

        def shared_at(lam: float) -> dict:
            return tau.apply_to(theta_plain, scale=lam)

        scales["shared_scaled"] = choose_scale(score, shared_at, params.controls.scales)
        models["shared_scaled"] = _with_state(shared, shared_at(scales["shared_scaled"]["chosen"]))

    reference = ref[reference_split(ref)]
    # one dict per model: fd_contrast keeps each model's bootstrap FDs in it for the other contrasts it enters
    feats = {"merged": {"features": read_npz(SAMPLES_DIR / "merged.npz")["features"]}}
    metrics = {}
    for name in names:
        model = models[name]
        save_model(model, scheduler, out / "models" / name, {"control": name, **scales.get(name, {})})
        headline, _ = score_models(params, run, name, [model], None, scheduler, out / "samples", out / "evaluation")
        metrics[name] = headline
        feats[name] = {"features": read_npz(out / "samples" / f"{name}.npz")["features"]}
    rounds = params.report.bootstrap_rounds
    contrasts = {
        f"{a}_minus_{b}": distances.fd_contrast(feats[a], feats[b], reference, rounds,
                                                derive_seed(params.evaluate.seed, "paired-fd"))
        for a, b in CONTRASTS if a in feats and b in feats
    }
    return {"scales": scales, "metrics": metrics, "contrasts": contrasts, "reference": reference_split(ref),
            "bootstrap_rounds": rounds}


def _with_state(model, state: dict):
    full = model.state_dict()
    full.update(state)
    copy = type(model).from_config(model.config)
    copy.load_state_dict(full)
    return copy.eval()


def render(record: dict) -> str:
    if not record["models"]:
        return "# Controls\n\nNone built (controls.models is empty).\n"
    lines = ["# Controls", "",
             f"FD against the {record['reference']} split, the same test noise as evaluate@*; paired intervals: "
             f"95% bootstrap, {record['bootstrap_rounds']} resamples.", "",
             "| model | FD | KID | held-out loss | chosen scale |", "|---|---|---|---|---|"]
    for name, m in record["metrics"].items():
        chosen = record["scales"].get(name, {}).get("chosen", "")
        lines.append(f"| {name} | {m['fd']:.4f} | {m['kid']:.5f} | {m['heldout_loss']:.5f} | {chosen} |")
    lines += ["", "| contrast | FD difference [95% CI] | verdict |", "|---|---|---|"]
    for key, c in record["contrasts"].items():
        lines.append(f"| {key.replace('_minus_', ' − ')} | {c['fd']:+.4f} [{c['fd_ci'][0]:+.4f}, "
                     f"{c['fd_ci'][1]:+.4f}] | {c['verdict']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main("controls", controls))
