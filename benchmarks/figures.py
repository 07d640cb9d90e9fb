"""The pictures of benchmarks/README.md, drawn from the saved results (no training).

    pip install -r benchmarks/requirements.txt       # matplotlib
    python benchmarks/figures.py                     # reads and writes out/ (--out)

Reads <out>/*-compare.json and <out>/claims.json; draws what they hold, into <out>:
accuracy_<suite>.png (per-task test accuracy by method, mean and std over seeds), loss_curves.png
(the training loss of every method, every 25 steps), learned.png (what the task-specific parts
learned: task x head / up-projection / module heatmaps), head_similarity.png (per layer) and
sizes.png (test and training-set accuracy against the training-set size, per method). The
pictures in benchmarks/ are copies of these, from the commands of benchmarks/README.md.
"""
import argparse
import json
import os
import statistics

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = {"default": ["sort", "inc", "first_ge5", "has7"],
         "interference": ["sort", "sort_desc", "inc", "dec", "rotate"]}


def accuracy(results, suite, path):
    tasks = TASKS[suite] + (["has7 shifted"] if suite == "default" else [])
    labels = [label for label in results if label != "none"]
    fig, ax = plt.subplots(figsize=(11, 3.8))
    width = 0.8 / len(tasks)
    for j, t in enumerate(tasks):
        vals = [[100 * (r["accuracy"]["shift"]["has7"] if t == "has7 shifted" else r["accuracy"]["test"][t])
                 for r in results[label]] for label in labels]
        ax.bar([i + (j - (len(tasks) - 1) / 2) * width for i in range(len(labels))],
               [statistics.mean(v) for v in vals], width, label=t,
               yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals], capsize=2)
    ax.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
    ax.set_ylabel("test accuracy, %")
    ax.set_ylim(0, 118)                                  # room for the legend above the bars
    ax.set_title(f"{suite} suite: accuracy per task (mean and std over {len(results[labels[0]])} seeds)")
    ax.legend(fontsize=7, ncol=len(tasks), loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def heatmap(ax, matrix, rows, cols, title):
    im = ax.imshow(matrix, vmin=0, vmax=max(1.0 / len(cols) * 2, max(max(r) for r in matrix)), cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.5 else "k")
    ax.set_title(title, fontsize=8)
    return im


def learned(claims, path):
    panels = [("hydra", "routing", "HydraLoRA routing, default", "B"),
              ("i hydra", "routing", "HydraLoRA routing, interference r=2", "B"),
              ("i mtl", "mixing_weights", "MTL-LoRA p_t (tau 0.1), interference", "B"),
              ("i mtl tau 0.5", "mixing_weights", "MTL-LoRA p_t (tau 0.5), interference", "B"),
              ("spurious", "graph", "MT-CRL graph g, default", "h")]
    panels = [p for p in panels if p[0] in claims]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), 2.8), squeeze=False)
    axes = axes[0]
    for ax, (label, key, title, col) in zip(axes, panels):
        m = claims[label][0]["learned"][key]                            # seed 0
        heatmap(ax, m, TASKS[claims[label][0]["suite"]], [f"{col}_{i}" for i in range(len(m[0]))],
                title + " (seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def head_similarity(claims, path):
    labels = [x for x in ["hydra", "mlora", "mlora offset", "i hydra", "i mlora", "i mlora offset"]
              if x in claims]
    if not labels:
        return False
    fig, ax = plt.subplots(figsize=(10, 3.2))
    for label in labels:
        sims = [list(r["learned"]["head_similarity"].values()) for r in claims[label]]
        mean = [statistics.mean(s[i] for s in sims if s[i] is not None) for i in range(len(sims[0]))]
        ax.plot(mean, "o-" if label.startswith("i ") else "s--", ms=3, label=label)
    names = list(claims[labels[0]][0]["learned"]["head_similarity"])
    ax.set_xticks(range(len(names)), [n.replace("blocks.", "") for n in names], rotation=60, fontsize=6)
    ax.axhline(0.85, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("mean pairwise cosine of B_i")
    ax.set_title("head similarity per adapted layer (mean over seeds; dotted: the paper's 0.85; "
                 "'i ...': interference suite, r=2)", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def sizes(claims, path):
    """Test accuracy (solid) and training-set accuracy (dotted) against the training-set size,
    mean over the tasks and seeds, per method, on the default suite; the gap is overfitting."""
    series = {}                                      # method -> {size: [runs]}
    for label, rs in claims.items():
        n = rs[0]["settings"].get("train_samples")
        if isinstance(n, int) and rs[0]["suite"] == "default":
            series.setdefault(label.rsplit(" n", 1)[0], {})[n] = rs
    series = {k: v for k, v in series.items() if len(v) > 1}
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4))
    avg = lambda r, split: 100 * statistics.mean(r["accuracy"][split][t] for t in TASKS["default"])
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def loss_curves(compares, path):
    fig, axes = plt.subplots(1, len(compares), figsize=(6 * len(compares), 3.4), squeeze=False)
    for ax, (suite, results) in zip(axes[0], compares.items()):
        for label, rs in results.items():
            if rs[0]["losses"]:
                steps, losses = zip(*rs[0]["losses"])
                ax.plot(steps, losses, lw=1, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (seed 0)")
        ax.set_title(f"{suite} suite", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out", help="where compare.py and claims.py wrote their JSON; "
                   "the pictures go there too")
    args = p.parse_args()
    compares = {s: json.load(open(os.path.join(args.out, f"{s}-compare.json")))["results"]
                for s in TASKS if os.path.exists(os.path.join(args.out, f"{s}-compare.json"))}
    claims = {}                       # claims.py --regime all, unlimited or finite: each its file
    for name in ["claims.json", "claims-unlimited.json", "claims-finite.json"]:
        if os.path.exists(os.path.join(args.out, name)):
            claims |= json.load(open(os.path.join(args.out, name)))["results"]
    drawn = [f"accuracy_{suite}.png" for suite, results in compares.items()
             if accuracy(results, suite, os.path.join(args.out, f"accuracy_{suite}.png"))]
    pictures = [("loss_curves.png", loss_curves, compares), ("learned.png", learned, claims),
                ("head_similarity.png", head_similarity, claims), ("sizes.png", sizes, claims)]
    drawn += [name for name, draw, data in pictures if data and draw(data, os.path.join(args.out, name))]
    if not drawn:
        raise SystemExit(f"nothing to draw: {args.out} holds no results of compare.py or claims.py "
                         "(run them first, or pass their --out)")
    print(f"wrote into {args.out}/: {', '.join(drawn)}")


if __name__ == "__main__":
    main()
