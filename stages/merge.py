"""DVC stage merge: theta + scale * merge(tau_1..tau_N) with the weights of merge/weights.json -> models/merged/.

With ``merge.peft_combination`` set (LoRA fine-tunes only), PEFT merges the
range adapters as adapters (dtm_core/adapters.py) and the result is folded.
"""

from __future__ import annotations

import sys

from dtm_core import adapters
from dtm_core.config import Params
from dtm_core.errors import MissingInputError
from dtm_core.io import read_json
from dtm_core.merge import merge_files, parameter_distance
from dtm_core.model import (
    float_state,
    has_projection,
    load_scheduler,
    load_unet,
    pretrained_like,
    save_model,
    with_projection,
)
from dtm_core.partition import load_partition
from dtm_core.seeding import derive_seed
from dtm_core.tracking import NullRun
from stages.common import MERGED_DIR, PARTITION_FILE, PRETRAINED_DIR, TASK_VECTOR_DIR, WEIGHTS_FILE, main, range_dir


def merge_inputs(n: int):
    """The merged model's template (range model 0), the pretrained weights in its layout, the N task vectors."""
    template = load_unet(range_dir(0), what="range model 0")
    base = pretrained_like(PRETRAINED_DIR, template)
    return template, base, [TASK_VECTOR_DIR / f"range-{i}.safetensors" for i in range(n)]


def merged_state(params: Params, base: dict, files: list, weights: list[float],
                 block_weights: dict | None = None) -> dict:
    """The merged weights for ``weights`` with the configured method, density, scale and seed."""
    mc = params.merge
    return merge_files(base, files, weights, mc.method, density=mc.density, scale=mc.scale,
                       seed=derive_seed(params.seed, "merge"), block_weights=block_weights)


def merge(params: Params, run=NullRun()) -> dict:
    ranges, _ = load_partition(PARTITION_FILE)
    mc = params.merge
    record = read_json(WEIGHTS_FILE, "merge weights")
    weights, block_weights = record["weights"], record.get("block_weights")
    if len(weights) != len(ranges):
        raise MissingInputError(
            f"'{WEIGHTS_FILE}' holds {len(weights)} weights for the partition's {len(ranges)} ranges: "
            "re-run dvc repro merge_weights"
        )
    template, base, files = merge_inputs(len(ranges))
    if mc.peft_combination is None:
        merged = merged_state(params, base, files, weights, block_weights)
    else:
        start = with_projection(load_unet(PRETRAINED_DIR, what="pretrained model"), has_projection(template))
        merged = float_state(adapters.peft_merge(start, [range_dir(i) for i in range(len(ranges))],
                                                 [mc.scale * w for w in weights], mc.peft_combination, mc.density))
    full = template.state_dict()
    full.update(merged)
    template.load_state_dict(full)
    method = mc.method if mc.peft_combination is None else f"peft:{mc.peft_combination}"
    info = {"method": method, "scale": mc.scale, "density": mc.density, "weights_file": str(WEIGHTS_FILE),
            "ranges": [list(r) for r in ranges]}
    save_model(template, load_scheduler(PRETRAINED_DIR), MERGED_DIR, info)
    return {"distance_from_pretrained": parameter_distance(merged, base)}


if __name__ == "__main__":
    sys.exit(main("merge", merge))
