"""A tiny params profile: the full pipeline in well under a minute of compute."""

TINY_OVERRIDES = {
    # a tiny base trained in the pipeline instead of importing the shipped one
    "model": {"pretrained_path": None},
    "pretrain": {"steps": 30, "batch_size": 64, "lr": 0.002, "ema_max_decay": 0.99, "checkpoint_every": 0},
    "partition": {"ranges": [0, 1]},
    "finetune": {"steps": 10, "batch_size": 32, "checkpoint_every": 0},
    "evaluate": {
        "num_samples": 80,
        "sampling_steps": 4,
        "batch_size": 80,
        "kid_subsets": 5,
        "bootstrap_rounds": 10,
        "kid_subset_size": 50,
        "grid_size": 4,
        "classifier": {"steps": 40, "feature_dim": 16},
        "heldout_timesteps": 10,
    },
}


def tiny_params(base: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for section, values in TINY_OVERRIDES.items():
        merged = dict(out.get(section) or {})
        for k, v in values.items():
            if isinstance(v, dict):
                merged[k] = {**(merged.get(k) or {}), **v}
            else:
                merged[k] = v
        out[section] = merged
    return out
