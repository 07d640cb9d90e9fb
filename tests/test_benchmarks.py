"""The benchmarks' own logic: the claims verdict rule, every claim's runs defined, --seeds checked,
the pictures drawn where --out says from whatever results are there, and every script's bad
input refused in one line before anything trains."""
import json
import os
import re
import statistics
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import claims  # noqa: E402
import compare  # noqa: E402
import step_time  # noqa: E402
import tune_spurious  # noqa: E402


def test_verdict_follows_the_stated_rule():
    assert claims.verdict([2.0, 2.2, 1.8], 0.5) == "holds here"               # clear gain
    assert claims.verdict([0.3, 0.35, 0.4], 0.5) == "does not hold here"      # real but below 0.5
    assert claims.verdict([-3.0, -2.0, -2.5], 0.5) == "does not hold here"    # a loss
    assert claims.verdict([20.0, -10.0, 5.0], 0.5) == "cannot tell (spread too wide)"
    assert claims.verdict([0.02, 0.03, 0.04], 0.0) == "holds here"            # a threshold claim


def test_competitive_means_not_clearly_worse():
    assert claims.verdict([0.1, -0.1, 0.0], 0.5, competitive=True) == "holds here"      # a tie
    assert claims.verdict([-3.0, -2.5, -2.8], 0.5, competitive=True) == "does not hold here"
    assert claims.verdict([-8.0, 6.0, 1.0], 0.5,
                          competitive=True) == "cannot tell (spread too wide)"


def fake_run(label, suite, i):
    tasks = claims.train.SUITES[suite]
    acc = dict.fromkeys(tasks, 0.9 - 0.01 * i)
    accuracy = {"test": acc, "train": dict.fromkeys(tasks, 0.95), "shift": {"has7": 0.5 + 0.01 * i}}
    return {"suite": suite, "seed": i, "accuracy": accuracy,
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
    assert all(r.endswith(("holds here |", "does not hold here |",
                           "cannot tell (spread too wide) |")) for r in lines)
    for label, (suite, flags) in runs.items():                      # a finite set: its regime's
        assert ("--train-samples" in flags) == (runs is claims.FINITE), label


@pytest.mark.parametrize("script", ["compare.py", "claims.py"])
def test_seeds_must_be_a_positive_integer(script):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--seeds",
                          "0"], capture_output=True, text=True)
    assert res.returncode == 2 and "--seeds: must be an integer >= 1, got 0" in res.stderr


def test_figures_draw_one_suite_into_out_and_say_when_there_is_nothing(tmp_path):
    pytest.importorskip("matplotlib")
    figures = [sys.executable, os.path.join(ROOT, "benchmarks", "figures.py"), "--out",
               str(tmp_path)]
    res = subprocess.run(figures, capture_output=True, text=True)
    assert res.returncode == 1 and "nothing to draw" in res.stderr
    results = {label: [fake_run(label, "default", i) for i in range(2)]
               for label in ["lora", "mtl"]}
    (tmp_path / "default-compare.json").write_text(json.dumps(dict(results=results, pairs={})))
    before = {f: os.path.getmtime(os.path.join(ROOT, "benchmarks", f))
              for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".png")}
    res = subprocess.run(figures, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["accuracy_default.png",
                                                              "loss_curves.png"]
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


# ----------------------------------------------------------------------------- figures.py


@pytest.fixture
def figures():
    pytest.importorskip("matplotlib")
    import figures
    return figures


def draw(figures, out, monkeypatch):
    """figures.py --out `out`, in this process; returns what it printed."""
    monkeypatch.setattr(sys, "argv", ["figures.py", "--out", str(out)])
    figures.main()


def refusal(run):
    """The message of the SystemExit that `run()` must end with: one line."""
    with pytest.raises(SystemExit) as e:
        run()
    message = str(e.value.code)
    assert "\n" not in message
    return message


def write(path, results, **extra):
    path.write_text(json.dumps(dict(results=results, **extra)))


@pytest.mark.parametrize("name, text", [
    ("default-compare.json", '{"results": {"lora": [{"suite": "def'),     # truncated
    ("claims.json", "{}"),
    ("claims-finite.json", '{"results": {"lora": {"suite": "default"}}}'),   # not a list of runs
    ("claims-controls.json", '{"results": {"lora": [{"suite": "default"}]}}'),   # no accuracy
    ("claims.json", '{"results": {}, "sweeps": {"default": {"abc": "align"}}}')])
def test_figures_refuse_a_broken_results_file_in_one_line(tmp_path, figures, monkeypatch, name,
                                                          text):
    (tmp_path / name).write_text(text)
    message = refusal(lambda: draw(figures, tmp_path, monkeypatch))
    assert str(tmp_path / name) in message and "rerun" in message, message
    assert not list(tmp_path.glob("*.png"))


def test_figures_without_losses_draw_the_rest(tmp_path, figures, monkeypatch):
    results = {label: [fake_run(label, "default", i) for i in range(2)]
               for label in ["lora", "mtl"]}
    for rs in results.values():
        for r in rs:
            del r["losses"]                                 # an older file, or none's runs
    write(tmp_path / "default-compare.json", results, pairs={})
    draw(figures, tmp_path, monkeypatch)
    assert [p.name for p in tmp_path.glob("*.png")] == ["accuracy_default.png"]


def test_figures_say_in_one_line_when_out_cannot_be_written(tmp_path, figures, monkeypatch):
    results = {label: [fake_run(label, "default", i) for i in range(2)]
               for label in ["lora", "mtl"]}
    write(tmp_path / "default-compare.json", results, pairs={})
    (tmp_path / "accuracy_default.png").mkdir()           # in the way (root ignores the chmod)
    os.chmod(tmp_path, 0o555)                             # read-only, for any other user
    try:
        message = refusal(lambda: draw(figures, tmp_path, monkeypatch))
    finally:
        os.chmod(tmp_path, 0o755)
    assert message.startswith(f"figures.py: cannot write {tmp_path / 'accuracy_default.png'} (")
    assert "--out" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy_default.png",
                                                          "default-compare.json"]   # no tmp left


def test_figures_draw_the_suite_the_runs_hold_not_the_one_the_file_name_says(tmp_path, figures,
                                                                             monkeypatch):
    results = {label: [fake_run(label, "interference", i) for i in range(2)]
               for label in ["lora", "mtl", "spurious"]}
    for r in results["spurious"]:
        r["learned"]["graph"] = [[0.25] * 4 for _ in claims.train.SUITES["interference"]]
        r["settings"]["rank"] = 2
    write(tmp_path / "default-compare.json", results, pairs={})
    write(tmp_path / "claims.json", results, runs={})
    titles, heatmap = [], figures.heatmap

    def spy(ax, matrix, rows, cols, title):
        titles.append((title, rows))
        return heatmap(ax, matrix, rows, cols, title)
    monkeypatch.setattr(figures, "heatmap", spy)
    draw(figures, tmp_path, monkeypatch)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "accuracy_interference.png", "learned.png", "loss_curves.png"]
    assert titles == [("MT-CRL graph g, interference r=2 (seed 0)",
                       claims.train.SUITES["interference"])]


def controls(low_runs=5):
    """Fake results of claims.py --regime controls: known accuracies and L_align per seed."""
    results = {}
    for k, (label, (suite, flags, n)) in enumerate(claims.CONTROLS.items()):
        rs = []
        for i in range(n):
            run = fake_run(label, suite, i)
            run["accuracy"]["test"] = {t: 0.3 + 0.05 * i + 0.01 * k + 0.02 * j
                                       for j, t in enumerate(claims.train.SUITES[suite])}
            run["learned"] = {"alignment_loss": 0.1 * (k + 1) + 0.01 * i} if "align" in label \
                else {}
            rs.append(run)
        results[label] = rs
    return results


def figure_of(figures, monkeypatch, name):
    """Keeps the figure that figures.py saves as `name`, to read what it drew."""
    kept, save = {}, figures.save

    def spy(fig, path):
        if os.path.basename(path) == name:
            kept["fig"] = fig
        return save(fig, path)
    monkeypatch.setattr(figures, "save", spy)
    return kept


@pytest.mark.parametrize("name", ["claims-controls.json", "claims.json"])
def test_figures_draw_the_low_resource_bars_in_order_with_every_seed(tmp_path, figures,
                                                                     monkeypatch, name):
    results = controls()
    write(tmp_path / name, results, runs={}, sweeps=claims.SWEEPS, low=claims.LOW_BARS)
    kept = figure_of(figures, monkeypatch, "lowres.png")
    draw(figures, tmp_path, monkeypatch)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["align_sweep.png", "lowres.png"]
    ax = kept["fig"].axes[0]
    expected = [[100 * r["accuracy"]["test"]["inc"] for r in results[label]]
                for label in claims.LOW_BARS]
    heights = [bar.get_height() for bar in ax.patches]
    assert heights == pytest.approx([statistics.mean(xs) for xs in expected])
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        f"{label} ({len(xs)})" for label, xs in zip(claims.LOW_BARS, expected)]
    dots = [y for line in ax.get_lines() if line.get_marker() == "o" for y in line.get_ydata()]
    assert dots == pytest.approx([x for xs in expected for x in xs])          # every seed
    assert "3-5 seeds" in ax.get_title()


def pairs(xs, ys):
    return [v for xy in zip(xs, ys) for v in xy]


def test_figures_draw_accuracy_and_alignment_loss_against_the_weight(tmp_path, figures,
                                                                     monkeypatch):
    results = controls()
    write(tmp_path / "claims-controls.json", results, runs={}, sweeps=claims.SWEEPS,
          low=claims.LOW_BARS)
    kept = figure_of(figures, monkeypatch, "align_sweep.png")
    draw(figures, tmp_path, monkeypatch)
    acc_ax, loss_ax = kept["fig"].axes
    drawn = {c.get_label(): [x for xy in c.lines[0].get_xydata() for x in xy]
             for ax in (acc_ax, loss_ax) for c in ax.containers}       # x0, y0, x1, y1, ...
    for suite_text, by_weight in claims.SWEEPS.items():
        suite = results[by_weight[0]][0]["suite"]
        low = {"default": "inc", "related": "sort_high"}[suite]
        ws = sorted(by_weight)
        rs = [results[by_weight[w]] for w in ws]
        mean = [statistics.mean(100 * statistics.mean(r["accuracy"]["test"].values()) for r in x)
                for x in rs]
        assert drawn[f"{suite_text}: mean over tasks"] == pytest.approx(pairs(ws, mean))
        low_acc = [statistics.mean(100 * r["accuracy"]["test"][low] for r in x) for x in rs]
        assert drawn[f"{suite_text}: {low}"] == pytest.approx(pairs(ws, low_acc))
        align = [statistics.mean(r["learned"]["alignment_loss"] for r in x) for x in rs]
        assert drawn[suite_text] == pytest.approx(pairs(ws, align))
    assert acc_ax.get_xscale() == "symlog" and 0 in list(acc_ax.get_xticks())


def test_figures_skip_the_controls_pictures_whose_runs_are_absent(tmp_path, figures, monkeypatch):
    results = {k: v for k, v in controls().items() if k in ("lora low", "align low w0")}
    write(tmp_path / "claims-controls.json", results, runs={}, sweeps=claims.SWEEPS,
          low=claims.LOW_BARS)
    kept = figure_of(figures, monkeypatch, "lowres.png")
    draw(figures, tmp_path, monkeypatch)                           # what is there is drawn
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["align_sweep.png", "lowres.png"]
    assert [t.get_text() for t in kept["fig"].axes[0].get_xticklabels()] == ["lora low (5)"]
    write(tmp_path / "claims-controls.json", {"lora n64": results["lora low"]}, runs={})
    for p in tmp_path.glob("*.png"):
        p.unlink()
    monkeypatch.setattr(sys, "argv", ["figures.py", "--out", str(tmp_path)])
    assert "nothing to draw" in refusal(figures.main)              # no sweeps, no low: none


# ----------------------------------------------------------------------------- step_time.py


@pytest.mark.parametrize("flags, named", [
    (["--widths", "abc"], "--widths"), (["--widths", ""], "--widths"),
    (["--widths", "64,0"], "--widths"), (["--rounds", "0"], "--rounds"),
    (["--steps", "0"], "--steps"), (["--methods", "lora,sgd"], "--methods"),
    (["--device", "cuda"], "--device cuda")])
def test_step_time_refuses_bad_flags_by_name(flags, named, monkeypatch, capsys):
    if flags[0] == "--device" and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    monkeypatch.setattr(sys, "argv", ["step_time.py", "--methods", "lora", *flags])
    with pytest.raises(SystemExit) as e:
        step_time.main()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith("step_time.py: error: ") and named in err, err


def test_step_time_docstring_names_what_exists():
    named = re.findall(r"train\.(?!py\b)(\w+)", step_time.__doc__)       # not train.py
    assert "adapt" in named and all(hasattr(step_time.train, name) for name in named), named
    assert "build_model" not in step_time.__doc__ and "regularizer" not in step_time.__doc__


# ----------------------------------------------------------------------------- tune_spurious.py


def fake_train_run(calls):
    def run(args):
        calls.append(args)
        tasks = claims.train.SUITES[args.suite]
        return {"accuracy": {"val": dict.fromkeys(tasks, args.invariance_weight / 100)}}
    return run


def test_tune_spurious_keeps_an_out_with_a_space_whole(tmp_path, monkeypatch, capsys):
    calls, out = [], str(tmp_path / "my out")
    monkeypatch.setattr(tune_spurious.train, "run", fake_train_run(calls))
    monkeypatch.setattr(sys, "argv", ["tune_spurious.py", "--out", out, "--grid", "1,3",
                                      "--seeds", "0,1", "--flags", "--modules 2 --rho '0.7,0.9'"])
    tune_spurious.main()
    assert [(a.invariance_weight, a.seed) for a in calls] == [(1, 0), (1, 1), (3, 0), (3, 1)]
    assert all(a.out == out and a.base == os.path.join(out, "base.pt") and a.modules == 2
               and a.rho == [0.7, 0.9] and a.method == "spurious" for a in calls)
    assert capsys.readouterr().out.strip().endswith("best --invariance-weight: 3")


@pytest.mark.parametrize("flags", ["--method lora", "--seed 0", "--out x", "--invariance-weight 2",
                                   "--modules 3 --steps", "--modules '1"])
def test_tune_spurious_checks_flags_before_the_first_run(flags, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(tune_spurious.train, "run", fake_train_run(calls))
    monkeypatch.setattr(sys, "argv", ["tune_spurious.py", "--grid", "1,3", "--flags", flags])
    with pytest.raises(SystemExit) as e:
        tune_spurious.main()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "error: " in err and calls == [], err


# ----------------------------------------------------------------------------- compare.py


def fake_metrics(calls):
    def run(args):
        calls.append((args.method, args.no_router, args.seed, args.steps))
        tasks = claims.train.SUITES[args.suite]
        return {"suite": args.suite, "trainable": 100 * args.rank, "base_params": 10**5,
                "accuracy": {"test": dict.fromkeys(tasks, 0.5), "shift": {"has7": 0.5}},
                "steps_per_s": 1.0, "settings": {"rank": args.rank}, "losses": []}
    return run


@pytest.mark.parametrize("flags, named", [
    (["--method", "lora"], "--method"), (["--meth", "lora"], "--method"),
    (["--tasks", "inc"], "--tasks"), (["--resume"], "--resume"), (["--rank", "0"], "--rank"),
    (["--align-weight", "0.1"], "--align-weight"), (["--steps", "0"], "--steps")])
def test_compare_checks_every_flag_before_the_first_run(tmp_path, flags, named, monkeypatch,
                                                        capsys):
    calls = []
    monkeypatch.setattr(compare.train, "run", fake_metrics(calls))
    monkeypatch.setattr(sys, "argv", ["compare.py", "--seeds", "1", "--out", str(tmp_path), *flags])
    with pytest.raises(SystemExit) as e:
        compare.main()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and named in err and calls == [], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suite", ["default", "interference"])
def test_compare_passes_other_flags_to_every_run_of_its_suite(tmp_path, suite, monkeypatch):
    calls = []
    monkeypatch.setattr(compare.train, "run", fake_metrics(calls))
    monkeypatch.setattr(sys, "argv", ["compare.py", "--seeds", "2", "--out", str(tmp_path),
                                      "--suite", suite, "--steps", "7"])
    compare.main()
    methods = ["none", "full", "lora", "multihead", "multihead", "mtl", "align", "spurious"]
    methods = methods[:-1] if suite == "interference" else methods      # no environments there
    assert [c[0] for c in calls] == [m for m in methods for _ in range(2)]
    assert [c[1] for c in calls].count(True) == 2
    assert {c[2] for c in calls} == {0, 1} and {c[3] for c in calls} == {7}
    saved = json.loads((tmp_path / f"{suite}-compare.json").read_text())
    assert len(saved["results"]) == len(methods)
