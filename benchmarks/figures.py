"""The pictures of benchmarks/README.md, drawn from the saved results (no training).

    pip install -r benchmarks/requirements.txt       # matplotlib
    python benchmarks/figures.py                     # reads out/*-compare.json and out/claims.json

Writes into benchmarks/: accuracy_default.png and accuracy_interference.png (per-task test
accuracy by method, mean and std over seeds), learned.png (what the task-specific parts learned,
as task x head / up-projection / module heatmaps), head_similarity.png (per layer) and
loss_curves.png (the training loss of every method, read every 25 steps).
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
    fig, axes = plt.subplots(1, len(panels), figsize=(3.1 * len(panels), 2.8))
    for ax, (label, key, title, col) in zip(axes, panels):
        m = claims[label][0]["learned"][key]                            # seed 0
        heatmap(ax, m, TASKS[claims[label][0]["suite"]], [f"{col}_{i}" for i in range(len(m[0]))],
                title + " (seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def head_similarity(claims, path):
    fig, ax = plt.subplots(figsize=(10, 3.2))
    for label in ["hydra", "mlora", "mlora offset", "i hydra", "i mlora", "i mlora offset"]:
        sims = [list(r["learned"]["head_similarity"].values()) for r in claims[label]]
        mean = [statistics.mean(s[i] for s in sims if s[i] is not None) for i in range(len(sims[0]))]
        ax.plot(mean, "o-" if label.startswith("i ") else "s--", ms=3, label=label)
    names = list(claims["hydra"][0]["learned"]["head_similarity"])
    ax.set_xticks(range(len(names)), [n.replace("blocks.", "") for n in names], rotation=60, fontsize=6)
    ax.axhline(0.85, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("mean pairwise cosine of B_i")
    ax.set_title("head similarity per adapted layer (mean over seeds; dotted: the paper's 0.85; "
                 "'i ...': interference suite, r=2)", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loss_curves(compares, path):
    fig, axes = plt.subplots(1, len(compares), figsize=(6 * len(compares), 3.4))
    for ax, (suite, results) in zip(axes, compares.items()):
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out", help="where compare.py and claims.py wrote their JSON")
    args = p.parse_args()
    compares = {s: json.load(open(os.path.join(args.out, f"{s}-compare.json")))["results"]
                for s in TASKS if os.path.exists(os.path.join(args.out, f"{s}-compare.json"))}
    for suite, results in compares.items():
        accuracy(results, suite, os.path.join(HERE, f"accuracy_{suite}.png"))
    if compares:
        loss_curves(compares, os.path.join(HERE, "loss_curves.png"))
    claims_path = os.path.join(args.out, "claims.json")
    if os.path.exists(claims_path):
        claims = json.load(open(claims_path))["results"]
        learned(claims, os.path.join(HERE, "learned.png"))
        head_similarity(claims, os.path.join(HERE, "head_similarity.png"))
    print(f"wrote the pictures into {HERE}")


if __name__ == "__main__":
    main()
