"""DVC stage task_vectors: tau_i = theta_i - theta for every range -> task_vectors/.

Also the paper's Fig. 6b: norms by range, per-layer norms and the cosine
similarity of the task vectors (PNGs, JSON, and plots/task_vector_norms.tsv).
"""

from __future__ import annotations

import sys

from dtm_core import analysis
from dtm_core.config import Params
from dtm_core.io import atomic_dir, atomic_file, write_json
from dtm_core.model import float_state, load_unet, pretrained_like
from dtm_core.partition import load_partition
from dtm_core.task_vector import TaskVector
from dtm_core.tracking import NullRun
from stages.common import PARTITION_FILE, PRETRAINED_DIR, TASK_VECTOR_DIR, TASK_VECTOR_NORMS_TSV, main, range_dir


def task_vectors(params: Params, run=NullRun()) -> dict:
    ranges, _ = load_partition(PARTITION_FILE)
    with atomic_dir(TASK_VECTOR_DIR) as tmp:
        base = None
        for i in range(len(ranges)):
            model = load_unet(range_dir(i), what=f"range model {i}")
            if base is None:
                base = pretrained_like(PRETRAINED_DIR, model)
            tv = TaskVector.from_states(base, float_state(model), what=f"range model {i} ({range_dir(i)})")
            tv.save(tmp / f"range-{i}.safetensors")
            del tv, model  # one task vector in memory at a time
        files = [tmp / f"range-{i}.safetensors" for i in range(len(ranges))]
        stats = analysis.write_analysis(files, ranges, tmp)
        write_json(tmp / "norms.json", {"total": stats["total_norm"], "per_tensor": stats["per_tensor"],
                                        "per_layer": stats["per_layer"]})
    with atomic_file(TASK_VECTOR_NORMS_TSV) as handle:
        handle.write("range\tlo\thi\tnorm\n")
        for i, ((lo, hi), norm) in enumerate(zip(ranges, stats["total_norm"])):
            handle.write(f"{i}\t{lo}\t{hi}\t{norm:.6g}\n")
    for name in ("norms.json", "cosine.json", "tv_norms.png", "tv_layer_heatmap.png", "tv_cosine.png"):
        run.log_artifact(TASK_VECTOR_DIR / name, "task_vectors")
    return {f"norm_range_{i}": v for i, v in enumerate(stats["total_norm"])}


if __name__ == "__main__":
    sys.exit(main("task_vectors", task_vectors))
