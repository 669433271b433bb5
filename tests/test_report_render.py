"""stages/report.py's table and legend for a source with a test split, rendered from the committed report."""

import json
from pathlib import Path

from stages.report import render_markdown

ROOT = Path(__file__).resolve().parents[1]


def idx_report(closer):
    """The committed digits report dressed as an idx source's: a test split, its floor, a train column."""
    c = json.loads((ROOT / "reports" / "comparison.json").read_text())
    c["settings"].update(reference="test", reference_name="test", classifier_test_accuracy=0.8)
    c["floor"].update(fd_at_n=0.01, n=100, real_train_test_gap=0.002)
    for m in c["models"].values():
        m.update(fd_minus_floor=m["fd"] - 0.01, fd_train=m["fd"], closer_to_train=closer)
        if closer is None:  # fewer samples than held-out images: no FD at the floor's n
            m["fd_at_floor_n"] = None
    return c


def test_a_run_with_fewer_samples_than_held_out_images_says_what_was_not_computed():
    md = render_markdown(idx_report(None))
    assert "Closer to their train images than unseen real images are: not computed" in md
    assert "No model sits closer" not in md
    assert "| – |" in md and "– where a run has fewer samples than that" in md


def test_a_run_with_enough_samples_reads_the_flag():
    md = render_markdown(idx_report(False))
    assert "No model sits closer to its train images than unseen real images do." in md
    assert "not computed" not in md and "fewer samples than that" not in md
    flagged = idx_report(True)
    assert "above the validation images' +0.0020): ensemble, merged, pretrained, shared." in render_markdown(flagged)
