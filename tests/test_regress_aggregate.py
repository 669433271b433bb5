import json

import pytest

from dtm_core import aggregate, regress


def _comparison(scale=1.0):
    return {m: {"fd": fd * scale, "kid": kid * scale} for m, fd, kid in
            (("pretrained", 6.0, 0.12), ("shared", 5.4, 0.09), ("merged", 5.8, 0.12), ("ensemble", 5.5, 0.11))}


@pytest.fixture
def gate(tmp_path):
    cur = tmp_path / "comparison.json"
    ref = tmp_path / "reference.json"
    tol = tmp_path / "tolerances.json"
    cur.write_text(json.dumps(_comparison()))
    tol.write_text(json.dumps({"fd": {"abs": 0.01, "rel": 0.02}, "kid": {"abs": 0.002, "rel": 0.05},
                               "merged_minus_shared.fd": {"abs": 0.02}, "merged_minus_shared.kid": {"abs": 0.004}}))
    args = ["--current", str(cur), "--reference", str(ref), "--tolerances", str(tol),
            "--result", str(tmp_path / "regress.json")]
    assert regress.main(args + ["--bless"]) == 0
    return cur, args


def test_gate_passes_on_the_blessed_run(gate, capsys):
    cur, args = gate
    assert regress.main(args) == 0
    assert "no regression" in capsys.readouterr().out


def test_gate_fails_on_a_worse_run_with_a_readable_table(gate, capsys):
    cur, args = gate
    worse = _comparison()
    worse["merged"]["fd"] = 6.5  # +0.7 FD
    cur.write_text(json.dumps(worse))
    assert regress.main(args) == 1
    out = capsys.readouterr().out
    assert "merged.fd" in out and "REGRESSED" in out and "REGRESSION in 2 metric(s)" in out
    row = next(line for line in out.splitlines() if line.startswith("merged.fd"))
    assert "+0.70000" in row


def test_gate_reports_improvements_without_failing(gate, capsys):
    cur, args = gate
    cur.write_text(json.dumps(_comparison(scale=0.5)))
    assert regress.main(args) == 0
    assert "improved" in capsys.readouterr().out


def test_gate_missing_reference(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps(_comparison()))
    assert regress.main(["--current", str(tmp_path / "c.json"), "--reference", str(tmp_path / "none.json")]) == 2
    assert "regression reference" in capsys.readouterr().err


def test_tolerance_is_max_of_abs_and_rel():
    rows = regress.compare({"shared.fd": 5.5}, {"shared.fd": 5.4}, {"fd": {"abs": 0.01, "rel": 0.02}})
    assert rows[0].allowed == pytest.approx(0.108) and rows[0].status == "ok"


def _run(seed, merged, shared=5.4, p="0.3", t=0):
    metrics = {f"{m}/{k}": v for m in aggregate.MODELS for k, v in (("fd", 6.0), ("kid", 0.1))}
    metrics.update({"merged/fd": merged, "shared/fd": shared})
    return {"run_id": f"r{seed}{p}{t}", "start_time": t, "params": {"seed": str(seed), "finetune.p": p,
            "tracking.experiment_name": "x"}, "metrics": metrics}


def test_aggregate_over_seeds():
    runs = [_run(0, 5.0), _run(1, 5.2), _run(2, 5.4), _run(0, 9.0, p="0.5"),
            {"run_id": "unfinished", "params": {"seed": "3", "finetune.p": "0.3"}, "metrics": {}}]
    groups = aggregate.group_runs(runs)
    assert len(groups) == 2
    g = groups[0]
    assert g["seeds"] == ["0", "1", "2"]
    assert g["stats"]["merged/fd"]["mean"] == pytest.approx(5.2)
    assert g["stats"]["merged/fd"]["std"] == pytest.approx(0.2)
    assert g["stats"]["merged_minus_shared/fd"]["mean"] == pytest.approx(-0.2)
    assert "5.2000 ± 0.2000" in aggregate.render(groups)


def test_aggregate_keeps_the_newest_run_of_a_seed():
    groups = aggregate.group_runs([_run(0, 5.0, t=1), _run(0, 7.0, t=2)])
    assert groups[0]["stats"]["merged/fd"] == {"mean": 7.0, "std": 0.0, "n": 1}
