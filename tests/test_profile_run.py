"""benchmarks/profile_run.py: py-spy samples grouped per stage process and per project phase."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from profile_run import add_wall_seconds, phase, render, stage_name, summarise  # noqa: E402

EVAL = 'process 11:"python -m stages.evaluate --model merged"'
TUNE = 'process 12:"python -m stages.finetune --range 2"'
RUN = "run (/repo/stages/evaluate.py:80)"


def test_stage_names_come_from_the_stage_command_and_its_item():
    assert stage_name("python -m stages.evaluate --model merged") == "evaluate@merged"
    assert stage_name("/venv/bin/python -m stages.finetune --range 2") == "finetune@2"
    assert stage_name("python -m stages.report") == "report"
    assert stage_name("/venv/bin/python /venv/bin/dvc repro -f") == "dvc and other"


def test_a_phase_is_the_outermost_library_function_else_import_else_the_stage():
    sample = "sample (/repo/dtm_core/sampling.py:90)"
    unet = "forward (/venv/lib/python3.12/site-packages/diffusers/models/unets/unet_2d.py:250)"
    assert phase([RUN, sample, "step (/repo/dtm_core/sampling.py:40)", unet]) == "dtm_core.sampling.sample"
    assert phase(["<module> (/repo/stages/evaluate.py:3)", "_find_and_load (<frozen importlib._bootstrap>:1)",
                  unet]) == "import"
    assert phase([RUN]) == "stages.evaluate.run"
    worker = ["_bootstrap (/usr/lib/python3.12/threading.py:1)", "run (/repo/dtm_core/distributed.py:130)",
              "batch (/repo/dtm_core/sampling.py:100)", unet]
    assert phase(worker) == "dtm_core.sampling.batch"  # the worker's task, not the dispatcher that ran it
    assert phase(worker[:2]) == "dtm_core.distributed.run"
    assert phase(["main (/venv/dvc/cli.py:1)"]) == "interpreter and other"


def test_summarise_adds_samples_per_stage_and_phase_in_seconds():
    lines = [f"{EVAL};{RUN};sample (/repo/dtm_core/sampling.py:90) 30",
             f"{EVAL};{RUN};heldout_loss (/repo/dtm_core/denoising.py:60) 10",
             f"{EVAL};{RUN};sample (/repo/dtm_core/sampling.py:91) 10",
             f"{TUNE};run (/repo/stages/finetune.py:50);train (/repo/dtm_core/train.py:200) 20",
             "not a sample line"]
    result = summarise(lines, rate=10.0)
    assert result["stages"]["evaluate@merged"] == {
        "seconds": 5.0, "phases": {"dtm_core.sampling.sample": 4.0, "dtm_core.denoising.heldout_loss": 1.0}}
    assert result["stages"]["finetune@2"]["seconds"] == 2.0
    assert list(result["stages"]) == ["evaluate@merged", "finetune@2"]  # largest first
    assert result["total_seconds"] == 7.0
    assert result["phases"]["dtm_core.sampling.sample"] == 4.0


def test_wall_seconds_come_from_the_runs_timings_where_recorded(tmp_path):
    (tmp_path / "finetune@2.json").write_text('{"stage": "finetune@2", "stage_seconds": 31.26}')
    result = summarise([f"{TUNE};run (/repo/stages/finetune.py:50);train (/repo/dtm_core/train.py:200) 20",
                        f"{EVAL};{RUN} 10"], rate=10.0)
    add_wall_seconds(result, tmp_path)
    assert result["stages"]["finetune@2"]["wall_seconds"] == 31.3
    assert "wall_seconds" not in result["stages"]["evaluate@merged"]
    assert "| finetune@2 | 31 | 2 | dtm_core.train.train 2 |" in render(result)
