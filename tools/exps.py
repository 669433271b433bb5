"""Run a set of named variants of the pipeline as DVC experiments and read their results back.

Each variant is ``dvc exp run --temp -n <name> -S key=value ...``, run one at
a time in a temporary copy of the repository; DVC's run-cache restores every
stage a variant shares with a run already made (data, classifier, base
model...). A variant that finished on the current commit with the same
params is not run again: its experiment ref holds its committed outputs
(``reports/comparison.json`` is a ``cache: false`` out), so an interrupted
sweep resumes by running only what is missing.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from dtm_core.errors import ConfigError, DtmError
from dtm_core.io import atomic_file, write_json

log = logging.getLogger("dtm.exps")
REPORT = "reports/comparison.json"


class ExperimentError(DtmError):
    """A DVC experiment failed, or left no results."""


# sys.executable is relative when python was found through a relative PATH entry (PATH=.venv/bin:...),
# and the experiments run in a temporary copy of the repository: make it absolute.
PYTHON = os.path.abspath(sys.executable)
DVC = [PYTHON, "-m", "dvc"]  # this environment's DVC, whatever PATH says
# The experiments run the stages' `python -m stages.<name>` through the shell: it must be this python.
os.environ["PATH"] = os.pathsep.join([os.path.dirname(PYTHON), os.environ.get("PATH", "")])


def _dvc(*args: str, timeout: float = 600) -> str:
    try:
        proc = subprocess.run([*DVC, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ExperimentError(f"dvc {' '.join(args)} did not answer in {timeout:.0f} s; run the tool again "
                              "(it resumes: finished experiments are read, not run again)") from exc
    if proc.returncode != 0:
        raise ExperimentError(f"dvc {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip()[-1500:]}")
    return proc.stdout


def _git(*args: str, text: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=text)


def set_args(overrides: dict[str, Any]) -> list[str]:
    """``-S key=value`` arguments; values in YAML flow syntax (lists, strings, null)."""
    return [arg for key, value in overrides.items() for arg in ("-S", f"{key}={json.dumps(value)}")]


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``-S key=value`` items as a dictionary, each value read as DVC reads it."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"-S {item!r}: write key=value, e.g. -S finetune.steps=1500")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # PyYAML reads YAML 1.1, where 1e-4 is a string; DVC reads it as a number
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key] = parsed
    return out


def config_overrides(path: Optional[Path]) -> dict[str, Any]:
    """A configuration file (configs/fashion.yaml) as dotted -S overrides."""
    from dtm_core.config import flatten

    if path is None:
        return {}
    if not path.is_file():
        raise ConfigError(f"--config '{path}' does not exist; name a file such as configs/fashion.yaml")
    return flatten(yaml.safe_load(path.read_text()) or {})


def add_variant_arguments(parser, label_help: str) -> None:
    """The arguments every variant-running tool shares: -S, --config, --label, --collect-only and --baseline."""
    parser.add_argument("-S", "--set", action="append", default=[], help="key=value on top of params.yaml")
    parser.add_argument("--config", type=Path, help="a configuration whose keys go on top of params.yaml "
                        "(configs/fashion.yaml); -S wins over it")
    parser.add_argument("--label", default="", help=label_help)
    parser.add_argument("--collect-only", action="store_true", help="only read finished experiments")
    add_baseline_argument(parser)


def overrides(args) -> dict[str, Any]:
    """The overrides of :func:`add_variant_arguments`' arguments: the configuration's keys, then -S."""
    return {**config_overrides(args.config), **parse_sets(args.set)}


def report(name: str, hint: str) -> dict:
    """Experiment ``name``'s reports/comparison.json; an :class:`ExperimentError` ending in ``hint`` if it has none."""
    comparison = experiment_file(name)
    if comparison is None:
        raise ExperimentError(f"experiment '{name}' has no {REPORT} on this commit: {hint}")
    return comparison


def with_ci(value: float, ci: list[float], digits: int = 4) -> str:
    """``+v [+lo, +hi]``: an estimate and its interval as the tables show them."""
    return f"{value:+.{digits}f} [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def write_report(path: Path, result: dict, text: str) -> None:
    """``result`` as JSON at ``path`` and ``text`` beside it as ``.md``; the text is printed too."""
    write_json(path, result)
    with atomic_file(path.with_suffix(".md")) as handle:
        handle.write(text)
    print(text)


BASELINE: list[str] = ["HEAD"]  # the commits whose experiments are read, first match wins (``--baseline``)
# What the stages run: experiments of commits that differ here measured different pipelines.
PIPELINE_PATHS = ("dvc.yaml", "stages", "dtm_core", "pyproject.toml")


def pipeline_changes(revs: list[str]) -> dict[str, list[str]]:
    """For each rev after the first, the pipeline files (:data:`PIPELINE_PATHS`) that differ from the first's
    (revs git cannot compare are left out: they have no experiments to read either)."""
    out = {}
    for rev in revs[1:]:
        proc = _git("diff", "--name-only", revs[0], rev, "--", *PIPELINE_PATHS)
        if proc.returncode == 0 and proc.stdout.split():
            out[rev] = proc.stdout.split()
    return out


class _Baseline(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        global BASELINE
        BASELINE = list(values)
        setattr(namespace, self.dest, BASELINE)
        for rev, files in pipeline_changes(BASELINE).items():
            log.warning("--baseline %s and %s run different pipeline code (%s): their experiments are read "
                        "side by side all the same", BASELINE[0], rev, ", ".join(files[:8]))


def add_baseline_argument(parser) -> None:
    """``--baseline REV [REV ...]``: read the experiments run on these commits (sets :data:`BASELINE`), each from
    the first commit that has it, so a study whose rows ran on several commits is read whole; a warning names
    the pipeline files that differ between the commits."""
    parser.add_argument("--baseline", nargs="+", default=["HEAD"], action=_Baseline, metavar="REV",
                        help="read the experiments run on these commits, first match wins (default HEAD)")


@functools.lru_cache(maxsize=None)
def _pinned(repository: str, rev: str) -> str:
    """The commit ``rev`` named the first time this process asked: a commit made while a sweep runs must not hide
    the experiments it already ran."""
    return _git("rev-parse", rev).stdout.strip()


def experiment_refs() -> dict[str, str]:
    """Experiment name -> git ref, for the experiments whose baseline is one of :data:`BASELINE`.

    DVC keeps an experiment under ``refs/exps/<sha[:2]>/<sha[2:]>/<name>`` of
    the commit it started from, so results of older code are not taken for
    this commit's (uncommitted edits are not seen: commit before a sweep).
    The revs are resolved once per process, and HEAD as it is now is read
    last: committing while a sweep runs loses none of its experiments.
    """
    heads = [_pinned(os.getcwd(), rev) for rev in BASELINE]
    live = _git("rev-parse", "HEAD").stdout.strip()
    if live not in heads:  # variants run after a commit made while this tool ran keep their experiments there
        heads.append(live)
    out: dict[str, str] = {}
    for head in reversed(heads):  # the first commit's experiments overwrite the later ones'
        prefix = f"refs/exps/{head[:2]}/{head[2:]}/"
        refs = _git("for-each-ref", "--format=%(refname)", prefix).stdout.split()
        out.update({ref[len(prefix):]: ref for ref in refs if "/" not in ref[len(prefix):]})
    return out


def experiment_commit(name: str) -> Optional[str]:
    """The commit experiment ``name`` started from (None if it is not found)."""
    ref = experiment_refs().get(name)
    return None if ref is None else "".join(ref.split("/")[2:4])


def experiment_bytes(name: str, path: str) -> bytes:
    """The bytes of ``path`` as experiment ``name`` left it, git-tracked (read with git: no DVC repository to
    open) or inside a DVC-cached out (read from the local cache)."""
    import dvc.api
    from dvc.exceptions import DvcException

    ref = experiment_refs().get(name)
    if ref is None:
        raise ExperimentError(f"no experiment '{name}' on this commit")
    proc = _git("show", f"{ref}:{path}", text=False)
    if proc.returncode == 0:
        return proc.stdout
    try:
        return dvc.api.read(path, rev=ref, mode="rb")
    except (DvcException, FileNotFoundError) as exc:
        raise ExperimentError(f"'{path}' of experiment '{name}' cannot be read ({exc})") from exc


def experiment_file(name: str, path: str = REPORT) -> Optional[dict]:
    """A JSON (or YAML) file of experiment ``name``; None if the experiment or the file is missing."""
    try:
        data = experiment_bytes(name, path)
    except ExperimentError:
        return None
    return yaml.safe_load(data) if path.endswith(".yaml") else json.loads(data)


def experiment_params(name: str) -> Optional[dict]:
    """params.yaml as committed by experiment ``name``."""
    return experiment_file(name, "params.yaml")


def run_all(variants: dict[str, dict[str, Any]], rerun: bool = False) -> None:
    """Run every variant whose results are missing (all with ``rerun``), one after another; an
    :class:`ExperimentError` names those that failed.

    Each runs as ``dvc exp run --temp -n <name> -S ...``: in a temporary copy of the repository, its
    results kept as an experiment of this commit, one at a time (two torch jobs on two cores slow each
    other twentyfold). Never ``-f``: DVC's run-cache then restores every stage whose code, deps and
    params an earlier run already had (data, classifier, base, unchanged fine-tunes), so a stopped
    sweep resumes where it ended.
    """
    refs, failed = experiment_refs(), []
    for name, overrides in variants.items():
        if not rerun and experiment_file(name) is not None and _same_params(name, overrides):
            continue
        if name in refs:  # a stale or failed one of this name: replace it
            _dvc("exp", "remove", refs[name])  # the full ref: the name may exist on other commits too
        log.info("running %s %s", name, overrides)
        proc = subprocess.run([*DVC, "exp", "run", "--temp", "-n", name, *set_args(overrides)])
        if proc.returncode != 0 or experiment_file(name) is None:
            failed.append(name)
    if failed:
        raise ExperimentError(f"experiments {failed} failed: their logs are above")


def apply_overrides(params: dict, overrides: dict[str, Any]) -> dict:
    """``params`` (a params.yaml dictionary, changed in place and returned) with dotted ``key: value`` set."""
    for key, value in overrides.items():
        node = params
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return params


def params_with(overrides: dict[str, Any], name: str = "params.yaml"):
    """The current params.yaml with ``overrides`` set, validated as the stages read it (errors name ``name``)."""
    from dtm_core.config import parse_params, read_yaml

    return parse_params(apply_overrides(read_yaml("params.yaml"), overrides), name)


def _same_params(name: str, overrides: dict[str, Any]) -> bool:
    """Whether experiment ``name`` ran with these overrides (on top of the current params.yaml)."""
    committed = experiment_params(name)
    if committed is None:
        return False
    # compared as the stages read them: DVC's -S rewrites params.yaml in YAML 1.2 (`"no"` loses its quotes,
    # which PyYAML then reads as False), so the raw dictionaries of one and the same run can differ
    from dtm_core.config import parse_params

    return parse_params(committed, name).model_dump() == params_with(overrides).model_dump()


def _parent_runs(names: Iterable[str]) -> dict[str, list]:
    """Experiment name -> the MLflow parent runs of its pipeline runs (newest first)."""
    from mlflow.tracking import MlflowClient

    from dtm_core.config import load_params, parse_params
    from dtm_core.tracking import params_digest, tracking_uri

    params = load_params("params.yaml")
    client = MlflowClient(tracking_uri(params))
    exp = client.get_experiment_by_name(params.tracking.experiment_name)
    if exp is None:
        return {name: [] for name in names}
    search = lambda where: client.search_runs([exp.experiment_id], where, order_by=["start_time DESC"])  # noqa: E731
    out: dict[str, list] = {}
    for name in names:
        # a name is reused (seeds-1 of an earlier default): only the runs with this experiment's params count;
        # an experiment restored whole from DVC's run-cache started no run: the pipeline runs with the same
        # params made its outputs (make seeds', the default's)
        committed = experiment_params(name)
        digest = params_digest(parse_params(committed, name)) if committed is not None else None
        pipeline = "tags.`dtm.kind` = 'pipeline'" + (f" and tags.`dtm.params_digest` = '{digest}'" if digest else "")
        out[name] = search(f"attributes.run_name = '{name}' and {pipeline}") or (search(pipeline) if digest else [])
    return out


def mlflow_parent_runs(names: Iterable[str]) -> dict[str, list[str]]:
    """Experiment name -> the MLflow parent run ids of its pipeline runs (newest first)."""
    return {name: [r.info.run_id for r in runs] for name, runs in _parent_runs(names).items()}


def mlflow_parent_minutes(names: Iterable[str]) -> dict[str, Optional[float]]:
    """Experiment name -> wall minutes of its newest finished pipeline run (stages restored from the
    run-cache cost nothing there); None where there is none."""
    out: dict[str, Optional[float]] = {}
    for name, runs in _parent_runs(names).items():
        done = [r for r in runs if r.info.status == "FINISHED" and r.info.end_time]
        out[name] = (done[0].info.end_time - done[0].info.start_time) / 60000.0 if done else None
    return out
