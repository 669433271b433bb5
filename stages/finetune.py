"""DVC stage finetune@i: DeMe fine-tune of the pretrained model for range i -> models/range-<i>/."""
import sys

from dtm_core import cli
from dtm_core.steps import common
from dtm_core.steps import finetune as step


def _args(parser):
    parser.add_argument("--range", type=int, required=True, help="range index i in 0..N-1")


if __name__ == "__main__":
    sys.exit(cli.main(
        "finetune", lambda params, args, run: step.finetune_range(params, args.range, run),
        sections=("seed", "finetune", "partition"),
        metrics_file=lambda a: common.FINETUNE_METRICS_DIR / f"range-{a.range}.json",
        run_name=lambda a: f"finetune-range-{a.range}", dvc_stage=lambda a: f"finetune@{a.range}",
        add_args=_args,
    ))
