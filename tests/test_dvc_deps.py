"""Each stage in dvc.yaml depends on exactly the code its script runs.

A missing dep would let `dvc repro` reuse an out that a code change made
stale; an extra one re-runs stages for nothing (editing the report would
re-train every model). The files a stage runs are found by following its
script's imports (every import statement, also inside functions) through
the ``dtm_core`` and ``stages`` packages.
"""

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dtm_core", "stages")


def _module_file(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _package_of(path: Path) -> str:
    """The package a file's relative imports start from (its directory, for __init__.py too)."""
    return ".".join(path.relative_to(ROOT).parts[:-1])


def _imported_modules(path: Path) -> set[str]:
    """Dotted names of the project modules ``path`` imports (and their parent packages)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = _package_of(path).split(".")
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import name`: name may be a submodule or an attribute
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] not in PACKAGES:
                continue
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b too
                found.add(".".join(parts[:i]))
    return {m for m in found if _module_file(m) is not None}


def library_closure(script: Path) -> set[str]:
    """Repository-relative paths of every project file that running ``script`` imports."""
    seen: set[str] = set()
    todo = [script]
    files: set[str] = set()
    while todo:
        path = todo.pop()
        for module in _imported_modules(path):
            if module in seen:
                continue
            seen.add(module)
            file = _module_file(module)
            files.add(file.relative_to(ROOT).as_posix())
            todo.append(file)
    return files


# (name, body) of every stage; a foreach stage's body is its `do:`
STAGES = [(name, stage.get("do", stage))
          for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()]


@pytest.mark.parametrize("name,stage", STAGES, ids=[n for n, _ in STAGES])
def test_stage_depends_on_exactly_the_code_it_imports(name, stage):
    module = stage["cmd"].split()[2]
    assert stage["cmd"].split()[:2] == ["python", "-m"] and module == f"stages.{name}", stage["cmd"]
    script = f"stages/{name}.py"
    assert script in stage["deps"], f"{name}: the stage script itself must be a dep"
    listed = {d for d in stage["deps"] if d.endswith(".py") or d in PACKAGES} - {script}
    assert not listed & set(PACKAGES), f"{name}: list the files it runs, not a whole package"
    needed = library_closure(ROOT / script)
    assert not needed - listed, f"{name}: dvc.yaml misses deps {sorted(needed - listed)}"
    assert not listed - needed, f"{name}: dvc.yaml lists files the stage never imports {sorted(listed - needed)}"


def test_the_closure_follows_relative_and_lazy_imports():
    """The import walk itself: a report-only edit must not count as a training dep."""
    report = library_closure(ROOT / "stages/report.py")
    finetune = library_closure(ROOT / "stages/finetune.py")
    shared = library_closure(ROOT / "stages/finetune_shared.py")
    assert "dtm_core/distances.py" in report and "dtm_core/plots.py" in report
    assert "dtm_core/train.py" in finetune and "dtm_core/tracking.py" in finetune  # tracking: a lazy import in main
    assert "stages/report.py" not in finetune and "dtm_core/distances.py" not in finetune
    assert "stages/finetune.py" in shared  # the shared fine-tune reuses the range fine-tune's glue
    assert {"dtm_core/__init__.py", "stages/__init__.py", "stages/common.py"} <= finetune
    # dtm_core/errors.py reaches every stage through config; light stages do not import diffusers
    assert "dtm_core/model.py" not in report  # the report stage never imports diffusers


def test_the_base_directorys_documentation_is_not_a_pipeline_input():
    """pretrain depends on all of base/: its README must be ignored, or a docs edit re-runs the pipeline."""
    import subprocess
    import sys

    def ignored(path: str) -> bool:
        return subprocess.run([sys.executable, "-m", "dvc", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

    assert ignored("base/README.md") and ignored("base/fashion-unet.state/plateau.json")
    assert not ignored("base/digits-unet/config.json")
