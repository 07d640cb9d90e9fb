"""The pictures of benchmarks/README.md, drawn from the saved results (no training).

    pip install -r benchmarks/requirements.txt       # matplotlib
    python benchmarks/figures.py                     # reads and writes out/ (--out)

Reads <out>/*-compare.json (compare.py) and <out>/claims.json, claims-unlimited.json,
claims-finite.json, claims-controls.json (claims.py); draws what they hold, into <out>:
- accuracy_<suite>.png: per-task test accuracy by method, mean and std over seeds;
- loss_curves.png: the training loss of every method, every 25 steps (seed 0);
- learned.png: what the task-specific parts learned (task x head / up-projection / module);
- head_similarity.png: the multi-head methods' heads, per layer;
- sizes.png: test and training-set accuracy against the training-set size, per method;
- lowres.png (the controls): the low-resource task's test accuracy (inc, 64 samples among 1024)
  for each run of claims.py's LOW_BARS, a bar (mean, std) and a dot per seed;
- align_sweep.png (the controls): Align-LoRA's weight lambda against the mean test accuracy
  over the tasks and the low-resource task's, and against the alignment loss left after training;
- realtext.png (realtext_claims.py, realtext-claims.json): as lowres.png, the low-resource task of
  the unrelated suite (sentiment) and of the domains suite (movies), and the unseen domain of the
  heldout suite (movies), for each run of its "low".
A suite is what the runs say (each run's "suite"), never a file's name. A picture whose results
are absent is skipped. The pictures in benchmarks/ are copies of these, from the commands of
benchmarks/README.md.
"""
import argparse
import glob
import json
import os
import statistics

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TASKS = {"default": ["sort", "inc", "first_ge5", "has7"],              # train.SUITES
         "interference": ["sort", "sort_desc", "inc", "dec", "rotate"],
         "related": ["sort", "sort_low", "sort_high"],
         "unrelated": ["sentiment", "topic", "subjectivity", "party"],   # realtext.SUITES
         "domains": ["tweets", "amazon", "nyt", "movies"], "heldout": ["tweets", "amazon", "nyt"]}
LOW_TASK = {"default": "inc", "related": "sort_high",   # claims.py's low-resource task per suite
            "unrelated": "sentiment", "domains": "movies", "heldout": "movies"}   # heldout: unseen
CLAIMS_FILES = ["claims.json", "claims-unlimited.json", "claims-finite.json",
                "claims-controls.json"]
EXPECTED = ('{"results": {label: [one run\'s metrics per seed, each with its "suite" and '
            '"accuracy"]}}')


def load(path):
    """A results file of compare.py or claims.py, checked; a broken one is a one-line exit."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:                  # ValueError: JSON or its encoding
        raise SystemExit(f"figures.py: cannot read {path} ({e}): rerun the script that wrote it, "
                         "or move the file out of --out")
    results = data.get("results") if isinstance(data, dict) else None
    if not (isinstance(results, dict) and all(runs_ok(rs) for rs in results.values())):
        raise SystemExit(f"figures.py: {path} holds no results of compare.py or claims.py "
                         f"(expected {EXPECTED}): rerun the script that wrote it")
    sweeps, low = data.get("sweeps", {}), data.get("low", [])
    if not extras_ok(sweeps, low):
        raise SystemExit(f"figures.py: {path}: \"sweeps\" must map a suite to {{weight: label}} "
                         "and \"low\" be a list of labels: rerun claims.py")
    return data


def number(text):
    try:
        return float(text)
    except ValueError:
        return None


def extras_ok(sweeps, low):
    """claims.py's "sweeps" ({suite: {weight: label}}) and "low" ([label, ...])."""
    return (isinstance(sweeps, dict) and isinstance(low, list)
            and all(isinstance(by_w, dict) and all(isinstance(x, str) for x in by_w.values())
                    and all(number(w) is not None for w in by_w) for by_w in sweeps.values())
            and all(isinstance(x, str) for x in low))


def runs_ok(rs):
    """One label's runs: a non-empty list of metrics of one known suite, each with accuracies."""
    return (isinstance(rs, list) and len(rs) > 0
            and all(isinstance(r, dict) and isinstance(r.get("accuracy"), dict)
                    and isinstance(r["accuracy"].get("test"), dict) for r in rs)
            and len({r.get("suite") for r in rs}) == 1 and rs[0].get("suite") in TASKS)


def save(fig, path):
    """The picture written whole (a temporary file, then a rename) or a one-line exit."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fig.tight_layout()
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    except OSError as e:
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise SystemExit(f"figures.py: cannot write {path} ({e.strerror or e}): pass an --out "
                         "you can write to")
    finally:
        plt.close(fig)
    return True


def mean_std(xs):
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def seeds_text(counts):
    counts = sorted(set(counts))
    n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"{n} seed" + ("" if n == "1" else "s")


def part(run, key):
    """What the run learned under `key` (None when absent)."""
    return (run.get("learned") or {}).get(key)


def accuracy(results, suite, path):
    tasks = TASKS[suite] + (["has7 shifted"] if suite == "default" else [])
    labels = [label for label in results if label != "none"]
    if not labels:
        return False
    fig, ax = plt.subplots(figsize=(11, 3.8))
    width = 0.8 / len(tasks)
    for j, t in enumerate(tasks):
        vals = [[100 * (r["accuracy"]["shift"]["has7"] if t == "has7 shifted"
                        else r["accuracy"]["test"][t]) for r in results[label]] for label in labels]
        ax.bar([i + (j - (len(tasks) - 1) / 2) * width for i in range(len(labels))],
               [statistics.mean(v) for v in vals], width, label=t,
               yerr=[mean_std(v)[1] for v in vals], capsize=2)
    ax.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
    ax.set_ylabel("test accuracy, %")
    ax.set_ylim(0, 118)                                  # room for the legend above the bars
    n = seeds_text(len(results[label]) for label in labels)
    ax.set_title(f"{suite} suite: accuracy per task (mean and std over {n})")
    ax.legend(fontsize=7, ncol=len(tasks), loc="upper center")
    return save(fig, path)


def heatmap(ax, matrix, rows, cols, title):
    top = max(1.0 / len(cols) * 2, max(max(r) for r in matrix))
    im = ax.imshow(matrix, vmin=0, vmax=top, cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="w" if v < 0.5 else "k")
    ax.set_title(title, fontsize=8)
    return im


def panel_title(key, run):
    """A heatmap's title from what the run says: the method, its suite and rank."""
    s = run.get("settings") or {}
    what = {"routing": "HydraLoRA routing", "graph": "MT-CRL graph g",
            "mixing_weights": "MTL-LoRA p_t" + (f" (tau {s['temperature']:g})"
                                                if "temperature" in s else "")}[key]
    rank = f" r={s['rank']}" if "rank" in s else ""
    return f"{what}, {run['suite']}{rank} (seed 0)"


def learned(claims, path):
    panels = [("hydra", "routing", "B"), ("i hydra", "routing", "B"),
              ("i mtl", "mixing_weights", "B"), ("i mtl tau 0.5", "mixing_weights", "B"),
              ("spurious", "graph", "h")]
    panels = [p for p in panels if p[0] in claims and part(claims[p[0]][0], p[1])]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), 2.8), squeeze=False)
    for ax, (label, key, col) in zip(axes[0], panels):
        run = claims[label][0]                                          # seed 0
        m = run["learned"][key]
        heatmap(ax, m, TASKS[run["suite"]], [f"{col}_{i}" for i in range(len(m[0]))],
                panel_title(key, run))
    return save(fig, path)


def head_similarity(claims, path):
    labels = [x for x in ["hydra", "mlora", "mlora offset", "i hydra", "i mlora", "i mlora offset"]
              if x in claims and part(claims[x][0], "head_similarity")]
    if not labels:
        return False
    fig, ax = plt.subplots(figsize=(10, 3.2))
    for label in labels:
        sims = [list(r["learned"]["head_similarity"].values()) for r in claims[label]]
        mean = [statistics.mean(s[i] for s in sims if s[i] is not None)
                for i in range(len(sims[0]))]
        style = "s--" if claims[label][0]["suite"] == "default" else "o-"
        ax.plot(mean, style, ms=3, label=f"{label} ({claims[label][0]['suite']})")
    names = list(claims[labels[0]][0]["learned"]["head_similarity"])
    ax.set_xticks(range(len(names)), [n.replace("blocks.", "") for n in names], rotation=60,
                  fontsize=6)
    ax.axhline(0.85, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("mean pairwise cosine of B_i")
    ax.set_title("head similarity per adapted layer (mean over seeds; dotted: the paper's 0.85; "
                 "dashed: default suite, solid: another)", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    return save(fig, path)


def sizes(claims, path):
    """Test accuracy (solid) and training-set accuracy (dotted) against the training-set size,
    mean over the tasks and seeds, per method, on the default suite; the gap is overfitting."""
    series = {}                                      # method -> {size: [runs]}
    for label, rs in claims.items():
        n = (rs[0].get("settings") or {}).get("train_samples")
        if isinstance(n, int) and rs[0]["suite"] == "default":
            series.setdefault(label.rsplit(" n", 1)[0], {})[n] = rs
    series = {k: v for k, v in series.items() if len(v) > 1}
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4))

    def avg(r, split):
        return 100 * statistics.mean(r["accuracy"][split][t] for t in TASKS["default"])
    for i, (method, by_n) in enumerate(sorted(series.items())):
        ns = sorted(by_n)
        for split, style in [("test", "o-"), ("train", "x:")]:
            ys = [statistics.mean(avg(r, split) for r in by_n[n]) for n in ns]
            ax.plot(ns, ys, style, color=f"C{i}", ms=4, label=f"{method} ({split})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training samples per task")
    ax.set_ylabel("mean accuracy over the tasks, %")
    ax.set_title("default suite: the training set (dotted) against the test draw (solid)",
                 fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    return save(fig, path)


def loss_curves(compares, path):
    curves = {suite: {label: rs[0]["losses"] for label, rs in results.items()
                      if rs[0].get("losses")} for suite, results in compares.items()}
    curves = {suite: c for suite, c in curves.items() if c}
    if not curves:                                     # e.g. only `none` runs, or older files
        return False
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 3.4), squeeze=False)
    for ax, (suite, by_label) in zip(axes[0], curves.items()):
        for label, losses in by_label.items():
            steps, values = zip(*losses)
            ax.plot(steps, values, lw=1, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (seed 0)")
        ax.set_title(f"{suite} suite", fontsize=9)
        ax.legend(fontsize=6)
    return save(fig, path)


def lowres_data(claims, low):
    """[(label, low-resource task, its test accuracy per seed in %)] for the labels of `low`
    that were run, in that order."""
    rows = []
    for label in low:
        task = LOW_TASK.get(claims[label][0]["suite"]) if label in claims else None
        if task and all(task in r["accuracy"]["test"] for r in claims[label]):
            rows.append((label, task, [100 * r["accuracy"]["test"][task] for r in claims[label]]))
    return rows


def lowres(claims, low, path, what="the low-resource task"):
    rows = lowres_data(claims, low)
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(rows) + 1.5), 4))
    families = list(dict.fromkeys(label.split()[0] for label, _, _ in rows))   # lora, mtl, ...
    for i, (label, task, xs) in enumerate(rows):
        color = f"C{families.index(label.split()[0])}"
        mean, std = mean_std(xs)
        ax.bar(i, mean, 0.7, yerr=std, capsize=3, color=color, alpha=0.55)
        spread = [0.0] if len(xs) == 1 else [-0.2 + 0.4 * k / (len(xs) - 1) for k in range(len(xs))]
        ax.plot([i + d for d in spread], xs, "o", color="k", ms=2.5)
    ax.set_xticks(range(len(rows)), [f"{label} ({len(xs)})" for label, _, xs in rows],
                  rotation=35, ha="right", fontsize=7)
    tasks = " / ".join(dict.fromkeys(task for _, task, _ in rows))
    ax.set_ylabel(f"{tasks} test accuracy, %")
    n = seeds_text(len(xs) for _, _, xs in rows)
    ax.set_title(f"{what} ({tasks}): test accuracy per run, mean and std over {n} "
                 "(dots: each seed; in brackets: seeds)", fontsize=8)
    return save(fig, path)


def sweep_data(claims, sweeps):
    """{suite description: [(lambda, mean accuracy over the suite's tasks per seed, the
    low-resource task's per seed (or None), final L_align per seed, the suite, the task)]},
    by lambda, for the labels that were run; % for the accuracies."""
    data = {}
    for desc, by_weight in sweeps.items():
        points = []
        for w, label in sorted(by_weight.items(), key=lambda kv: number(kv[0])):
            if label not in claims:
                continue
            rs, suite = claims[label], claims[label][0]["suite"]
            task = LOW_TASK.get(suite)
            mean = [100 * statistics.mean(r["accuracy"]["test"][t] for t in TASKS[suite])
                    for r in rs]
            low = [100 * r["accuracy"]["test"][task] for r in rs] if task else None
            align = [part(r, "alignment_loss") for r in rs]
            points.append((number(w), mean, low, [a for a in align if a is not None], suite, task))
        if points:
            data[desc] = points
    return data


def align_sweep(claims, sweeps, path):
    data = sweep_data(claims, sweeps)
    if not data:
        return False
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    weights = sorted({p[0] for points in data.values() for p in points})
    small = min([w for w in weights if w > 0] or [1e-3])
    for i, (desc, points) in enumerate(data.items()):
        ws = [p[0] for p in points]
        for k, what, style in [(1, "mean over tasks", "o-"), (2, points[0][5], "s--")]:
            if points[0][k] is not None:
                ms_ = [mean_std(p[k]) for p in points]
                acc_ax.errorbar(ws, [m for m, _ in ms_], [s for _, s in ms_], fmt=style,
                                color=f"C{i}", ms=4, capsize=2, label=f"{desc}: {what}")
        kept = [(p[0], mean_std(p[3])) for p in points if p[3]]
        if kept:
            loss_ax.errorbar([w for w, _ in kept], [m for _, (m, _) in kept],
                             [s for _, (_, s) in kept], fmt="o-", color=f"C{i}", ms=4, capsize=2,
                             label=desc)
    tops = [statistics.mean(p[3]) for points in data.values() for p in points if p[3]]
    if tops and min(tops) > 0 and max(tops) > 20 * min(tops):     # orders of magnitude apart
        loss_ax.set_yscale("log")
    for ax in (acc_ax, loss_ax):
        ax.set_xscale("symlog", linthresh=small, linscale=0.5)     # 0 shown, the rest log
        ax.set_xticks(weights, [f"{w:g}" for w in weights], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("Align-LoRA's weight lambda (0: LoRA, with L_align only measured)")
        ax.legend(fontsize=6)
    acc_ax.set_ylabel("test accuracy, %")
    loss_ax.set_ylabel("final L_align (mean over seeds)")
    n = seeds_text(len(p[1]) for points in data.values() for p in points)
    acc_ax.set_title(f"accuracy against lambda (mean and std over {n})", fontsize=9)
    loss_ax.set_title("the alignment loss left after training", fontsize=9)
    return save(fig, path)


def read(out):
    """compares: {suite: {label: runs}} and claims: {label: runs}, sweeps, low, from --out."""
    compares = {}                                     # by the suite the runs say they ran
    for path in sorted(glob.glob(os.path.join(glob.escape(out), "*-compare.json"))):
        for label, rs in load(path)["results"].items():
            compares.setdefault(rs[0]["suite"], {})[label] = rs
    claims, sweeps, low = {}, {}, []  # claims.py --regime all, unlimited, finite, controls
    for name in CLAIMS_FILES:
        if os.path.exists(os.path.join(out, name)):
            data = load(os.path.join(out, name))
            claims |= data["results"]
            sweeps |= data.get("sweeps", {})
            low = data.get("low") or low
    return compares, claims, sweeps, low


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out", help="where compare.py and claims.py wrote their JSON; "
                   "the pictures go there too")
    args = p.parse_args()
    compares, claims, sweeps, low = read(args.out)
    drawn = [f"accuracy_{suite}.png" for suite, results in compares.items()
             if accuracy(results, suite, os.path.join(args.out, f"accuracy_{suite}.png"))]
    pictures = [("loss_curves.png", loss_curves, [compares]),
                ("learned.png", learned, [claims]),
                ("head_similarity.png", head_similarity, [claims]),
                ("sizes.png", sizes, [claims]),
                ("lowres.png", lowres, [claims, low]),
                ("align_sweep.png", align_sweep, [claims, sweeps])]
    drawn += [name for name, draw, data in pictures
              if all(data) and draw(*data, os.path.join(args.out, name))]
    real = os.path.join(args.out, "realtext-claims.json")
    if os.path.exists(real):
        data = load(real)
        if lowres(data["results"], data["low"], os.path.join(args.out, "realtext.png"),
                  "MiniLM: the low-resource task, and the unseen domain"):
            drawn.append("realtext.png")
    if not drawn:
        raise SystemExit(f"nothing to draw: {args.out} holds no results of compare.py or "
                         "claims.py (run them first, or pass their --out)")
    print(f"wrote into {args.out}/: {', '.join(drawn)}")


if __name__ == "__main__":
    main()
