"""The benchmarks' own logic: the claims verdict rule, every claim's runs defined, --seeds checked,
and the pictures drawn where --out says from whatever results are there."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import claims  # noqa: E402


def test_verdict_follows_the_stated_rule():
    assert claims.verdict([2.0, 2.2, 1.8], 0.5) == "holds here"               # clear gain
    assert claims.verdict([0.3, 0.35, 0.4], 0.5) == "does not hold here"      # real but below 0.5
    assert claims.verdict([-3.0, -2.0, -2.5], 0.5) == "does not hold here"    # a loss
    assert claims.verdict([20.0, -10.0, 5.0], 0.5) == "cannot tell (spread too wide)"
    assert claims.verdict([0.02, 0.03, 0.04], 0.0) == "holds here"            # a threshold claim


def test_competitive_means_not_clearly_worse():
    assert claims.verdict([0.1, -0.1, 0.0], 0.5, competitive=True) == "holds here"      # a tie
    assert claims.verdict([-3.0, -2.5, -2.8], 0.5, competitive=True) == "does not hold here"
    assert claims.verdict([-8.0, 6.0, 1.0], 0.5, competitive=True) == "cannot tell (spread too wide)"


def fake_run(label, suite, i):
    tasks = claims.train.SUITES[suite]
    acc = dict.fromkeys(tasks, 0.9 - 0.01 * i)
    return {"suite": suite, "accuracy": {"test": acc, "train": dict.fromkeys(tasks, 0.95),
                                         "shift": {"has7": 0.5 + 0.01 * i}},
            "learned": {"head_similarity": {"a": 0.9, "b": 0.95}},
            "settings": {"train_samples": None}, "losses": [[25, 1.0]]}


@pytest.mark.parametrize("rows, runs", [(claims.CLAIMS, claims.RUNS),
                                        (claims.CLAIMS_FINITE, claims.FINITE)])
def test_table_has_a_row_per_claim_and_every_label_is_a_run(rows, runs):
    results = {label: [fake_run(label, suite, i) for i in range(3)]
               for label, (suite, flags) in runs.items()}
    lines = claims.claims_table(results, rows).splitlines()[2:]
    assert len(lines) == len(rows)
    for paper, claim, setting, metric, a, b in rows:
        assert a in runs and (isinstance(b, float) or b.lstrip("~") in runs)
    assert all(r.endswith(("holds here |", "does not hold here |", "cannot tell (spread too wide) |"))
               for r in lines)
    for label, (suite, flags) in runs.items():                      # a finite set: its regime's
        assert ("--train-samples" in flags) == (runs is claims.FINITE), label


@pytest.mark.parametrize("script", ["compare.py", "claims.py"])
def test_seeds_must_be_a_positive_integer(script):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--seeds", "0"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "--seeds: must be an integer >= 1, got 0" in res.stderr


def test_figures_draw_one_suite_into_out_and_say_when_there_is_nothing(tmp_path):
    pytest.importorskip("matplotlib")
    figures = [sys.executable, os.path.join(ROOT, "benchmarks", "figures.py"), "--out", str(tmp_path)]
    res = subprocess.run(figures, capture_output=True, text=True)
    assert res.returncode == 1 and "nothing to draw" in res.stderr
    results = {label: [fake_run(label, "default", i) for i in range(2)] for label in ["lora", "mtl"]}
    (tmp_path / "default-compare.json").write_text(json.dumps(dict(results=results, pairs={})))
    before = {f: os.path.getmtime(os.path.join(ROOT, "benchmarks", f))
              for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".png")}
    res = subprocess.run(figures, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["accuracy_default.png", "loss_curves.png"]
    assert before == {f: os.path.getmtime(os.path.join(ROOT, "benchmarks", f)) for f in before}


def test_figures_draw_the_sizes_picture_from_claims_finite_alone(tmp_path):
    pytest.importorskip("matplotlib")
    results = {}
    for label in ["lora", "align"]:
        for n in [64, 256]:
            runs = [fake_run(label, "default", i) for i in range(2)]
            for r in runs:
                r["settings"]["train_samples"] = n
            results[f"{label} n{n}"] = runs
    (tmp_path / "claims-finite.json").write_text(json.dumps(dict(results=results, runs={})))
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "figures.py"), "--out",
                          str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert [p.name for p in tmp_path.glob("*.png")] == ["sizes.png"]
