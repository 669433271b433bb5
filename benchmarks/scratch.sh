# Shell functions the GPU scripts share (sourced, from the repository root): a scratch copy of the pipeline,
# its git commit, and the stage seconds of a run in it.
commit_all() {  # a git commit of the scratch copy (dulwich where no git binary is installed)
  if command -v git >/dev/null; then
    git init -q && git add -A && git -c user.email=ci@local -c user.name=ci commit -qm tiny
  else
    python -c "from dulwich import porcelain as p; r = p.init('.'); p.add(r); p.commit(r, message=b'tiny', author=b'ci <ci@local>', committer=b'ci <ci@local>')"
  fi
}
copy_to() {  # what a pipeline run needs, without this checkout's DVC cache, lock, outputs or a base in training
  mkdir -p "$1" && cp -r dtm_core stages base dvc.yaml params.yaml pyproject.toml .dvcignore .gitignore .dvc "$1"/
  rm -rf "$1/.dvc/cache" "$1/.dvc/tmp" "$1"/base/*.state
}
stage_seconds() {  # each stage's seconds of the run in the current directory, and their sum
  python - <<'PY'
import json, pathlib
t = {p.stem: json.loads(p.read_text())["stage_seconds"] for p in sorted(pathlib.Path("timings").glob("*.json"))}
print("stage seconds:", ", ".join(f"{k} {v:.1f}" for k, v in t.items()), f"| sum {sum(t.values()):.0f} s")
PY
}
