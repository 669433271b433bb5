"""DVC stage evaluate@<model>: DDIM samples from common noise, FD/KID -> metrics/<model>.json."""
import sys

from dtm_core import cli
from dtm_core.steps import common
from dtm_core.steps import evaluate as step


def _args(parser):
    parser.add_argument("--model", required=True, choices=common.EVAL_MODELS)


if __name__ == "__main__":
    sys.exit(cli.main(
        "evaluate", lambda params, args, run: step.evaluate(params, args.model, run),
        sections=("seed", "evaluate"), metrics_file=lambda a: common.METRICS_DIR / f"{a.model}.json",
        run_name=lambda a: f"evaluate-{a.model}", dvc_stage=lambda a: f"evaluate@{a.model}",
        add_args=_args,
    ))
