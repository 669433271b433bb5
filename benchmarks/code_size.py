"""Lines of project code against a reference commit, new features of other issues left out (issue #34's count).

The count covers the .py and .sh files under dtm_core/, stages/, tools/ and benchmarks/ that the reference
commit holds, as they are in the working tree, plus the files that took code out of them (``MOVED_INTO``).
Files added since are not counted (the issue counts the files it was filed against); nor are the lines
inside the counted files that ``git blame`` gives to a commit in ``FEATURES`` (a feature of another issue).
Blame names the last commit that touched a line, so a feature's line that a later clean-up rewrote is
counted: that part of the adjustment errs towards more lines.

    python benchmarks/code_size.py --out docs/results/code_size.json
"""

from __future__ import annotations

import argparse
import subprocess
from collections import Counter

from dtm_core.io import write_json

REFERENCE = "ee34aa9"  # the commit issue #34 was filed against: 8,513 lines in these files
DIRS = ("dtm_core", "stages", "tools", "benchmarks")
MOVED_INTO = ("benchmarks/machine.py", "benchmarks/scratch.sh")  # helpers taken out of the counted files
FEATURES = {  # commits that only add a feature another issue asked for
    "6a8010f": "#33 data source idx (Fashion-MNIST)",
    "2bdf90d": "#33 make base-fashion: a base trained to its plateau, resumable",
    "fe21c1c": "#33 evaluate.reference: validation keeps sweeps off the test split",
    "e84a20e": "#33 load_params takes a configuration file (configs/fashion.yaml)",
    "6cff8de": "#33 controls stage",
    "c4d0b7f": "#33 analysis stage",
    "88a92a1": "#35 finetune.adapter: lora",
    "3907265": "#35 prompt-conditioned UNet",
    "6e59cdd": "#35 sampling and held-out loss with prompt labels",
    "892c837": "#35 model.conditioning: prompt in the pipeline",
    "93f797f": "#35 pretrain's message for a prompted run",
    "152ff6b": "#35 export of a prompted model",
    "c9f5be8": "#35 LoRA folding inside load_unet",
    "0fda17f": "#35 LoRA rank 2 default",
    "e6de8bc": "#36 benchmarks name the CPU model",
}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def counted_files(rev: str) -> list[str]:
    return [f for f in _git("ls-tree", "-r", "--name-only", rev, "--", *DIRS).split() if f.endswith((".py", ".sh"))]


def blame(path: str) -> Counter:
    """Short commit -> lines of ``path`` (as it is in the working tree) that commit last touched."""
    out = Counter()
    for line in _git("blame", "--line-porcelain", "--", path).splitlines():
        head = line[:40]
        if len(line) > 41 and line[40] == " " and all(c in "0123456789abcdef" for c in head):
            out[head[:7]] += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args()
    reference = counted_files(REFERENCE)
    reference_lines = sum(_git("show", f"{REFERENCE}:{f}").count("\n") for f in reference)
    present = set(_git("ls-files", "--", *DIRS).split())
    files = [f for f in reference if f in present] + list(MOVED_INTO)
    per_file = {f: blame(f) for f in files}
    now = sum(sum(c.values()) for c in per_file.values())
    by_feature = Counter()
    for counts in per_file.values():
        for commit, lines in counts.items():
            if commit in FEATURES:
                by_feature[commit] += lines
    adjusted = now - sum(by_feature.values())
    result = {
        "reference": REFERENCE, "reference_lines": reference_lines,
        "tree": _git("describe", "--always", "--dirty").strip(),
        "lines_now": now, "change_now": now / reference_lines - 1,
        "feature_lines": {f"{c} {FEATURES[c]}": n for c, n in by_feature.most_common()},
        "lines_without_features": adjusted, "change_without_features": adjusted / reference_lines - 1,
        "target": "at most 0.8 x the reference's lines", "removed_files": sorted(set(reference) - present),
        "moved_into": list(MOVED_INTO),
    }
    print(f"{REFERENCE}: {reference_lines} lines; now {now} ({result['change_now']:+.1%}); "
          f"without other issues' features {adjusted} ({result['change_without_features']:+.1%}); "
          f"target at most {int(0.8 * reference_lines)}")
    for key, lines in result["feature_lines"].items():
        print(f"  {lines:5d}  {key}")
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
