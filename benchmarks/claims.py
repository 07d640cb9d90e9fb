"""Each paper's headline claim, tested on our benchmark: one table row per claim, with a verdict.

    python benchmarks/claims.py                 # every run it needs (finished runs are reused)
    python benchmarks/figures.py                # the pictures, from the results this writes

Every claim compares two settings over the same seeds (3 by default). A run is train.py's run()
on its default 1000 steps; finished runs (also compare.py's) are reused, so an interrupted claims
run continues where it stopped. The verdict takes the per-seed differences d (same seed, same data
and init stream): "holds here" when mean(d) - 2 se > 0 and mean(d) > 0.5 points; "does not hold
here" when mean(d) + 2 se < 0.5 points (no gain worth the name, or a loss); else "cannot tell
(spread too wide)"; se = std(d) / sqrt(seeds). Threshold claims (head similarity above 0.85) use
the per-seed values minus the threshold the same way, without the 0.5 margin. "Competitive"
claims (a is not worse than b) hold when mean(d) - 2 se > -0.5 points and do not hold when
mean(d) + 2 se < -0.5 points.
Writes <out>/claims.md (the table) and <out>/claims.json (every run's metrics, for the figures).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402
import train  # noqa: E402

D, I = "default", "interference"
RUNS = {   # label -> (suite, train.py flags); interference runs at rank 2 (capacity-limited)
    "lora": (D, ["--method", "lora"]),
    "hydra": (D, ["--method", "multihead"]),
    "mlora": (D, ["--method", "multihead", "--no-router"]),
    "mlora offset": (D, ["--method", "multihead", "--no-router", "--init", "offset"]),
    "lora r24": (D, ["--method", "lora", "--rank", "24"]),
    "align": (D, ["--method", "align"]),
    "align mmd": (D, ["--method", "align", "--align-loss", "mmd"]),
    "spurious": (D, ["--method", "spurious"]),
    "spurious K=1": (D, ["--method", "spurious", "--modules", "1"]),
    "spurious no decorr": (D, ["--method", "spurious", "--decorr-weight", "0"]),
    "spurious no sparsity": (D, ["--method", "spurious", "--sparsity-weight", "0"]),
    "spurious envs all": (D, ["--method", "spurious", "--env-tasks", "all"]),
    "i lora r2": (I, ["--method", "lora", "--rank", "2"]),
    "i lora r4": (I, ["--method", "lora", "--rank", "4"]),
    "i lora r6": (I, ["--method", "lora", "--rank", "6"]),
    "i hydra": (I, ["--method", "multihead", "--rank", "2"]),
    "i mlora": (I, ["--method", "multihead", "--no-router", "--rank", "2"]),
    "i mlora offset": (I, ["--method", "multihead", "--no-router", "--init", "offset", "--rank", "2"]),
    "i mtl": (I, ["--method", "mtl", "--rank", "2"]),
    "i mtl tau 0.5": (I, ["--method", "mtl", "--rank", "2", "--temperature", "0.5"]),
    "i align": (I, ["--method", "align", "--rank", "2"]),
    "i align mmd": (I, ["--method", "align", "--rank", "2", "--align-loss", "mmd"]),
}


def avg(m):
    tasks = train.SUITES[m["suite"]]
    return sum(m["accuracy"]["test"][t] for t in tasks) / len(tasks) * 100


def shifted_b(m):
    return m["accuracy"]["shift"]["has7"] * 100


def head_sim(m):                     # median over layers of the mean pairwise cosine of the heads
    return statistics.median(v for v in m["learned"]["head_similarity"].values() if v is not None)


CLAIMS = [   # (paper, claim, our setting, metric, a, b or a threshold); "~b": a is competitive with b
    ("MTL-LoRA", "beats LoRA under task interference at about the same parameter count (tau 0.1, the authors')",
     "interference, r=2 (14.5k) vs LoRA r=4 (13.8k)", avg, "i mtl", "i lora r4"),
    ("MTL-LoRA", "the same with our earlier tau 0.5",
     "interference, r=2 (14.5k) vs LoRA r=4 (13.8k)", avg, "i mtl tau 0.5", "i lora r4"),
    ("MTL-LoRA", "beats LoRA at the same rank", "interference, r=2", avg, "i mtl", "i lora r2"),
    ("HydraLoRA", "beats LoRA at the same rank", "interference, r=2", avg, "i hydra", "i lora r2"),
    ("HydraLoRA", "beats LoRA at the same parameter count", "interference, r=2 (19.0k) vs LoRA r=6 (20.7k)",
     avg, "i hydra", "i lora r6"),
    ("HydraLoRA", "beats LoRA at the same rank", "default, r=8", avg, "hydra", "lora"),
    ("Align-LoRA", "M-LoRA's heads end up highly similar (median cosine > 0.85), zero init",
     "interference, r=2", head_sim, "i mlora", 0.85),
    ("Align-LoRA", "the same with the paper's offset init", "interference, r=2", head_sim, "i mlora offset", 0.85),
    ("Align-LoRA", "the same with the paper's offset init", "default, r=8", head_sim, "mlora offset", 0.85),
    ("Align-LoRA", "M-LoRA beats the routed HydraLoRA, zero init", "interference, r=2", avg, "i mlora", "i hydra"),
    ("Align-LoRA", "M-LoRA beats the routed HydraLoRA, offset init", "interference, r=2", avg,
     "i mlora offset", "i hydra"),
    ("Align-LoRA", "M-LoRA beats the routed HydraLoRA, offset init", "default, r=8", avg, "mlora offset", "hydra"),
    ("Align-LoRA", "one LoRA of higher rank is competitive with multi-head LoRA at equal parameters "
     "(LoRA r=4 vs M-LoRA)", "interference, 13.8k each", avg, "i lora r4", "~i mlora offset"),
    ("Align-LoRA", "the same, LoRA r=6 vs HydraLoRA", "interference, 20.7k vs 19.0k", avg, "i lora r6", "~i hydra"),
    ("Align-LoRA", "the same, LoRA r=24 vs HydraLoRA", "default, 82.9k vs 60.5k", avg, "lora r24", "~hydra"),
    ("Align-LoRA", "beats LoRA at the same rank (KL)", "default, r=8", avg, "align", "lora"),
    ("Align-LoRA", "beats LoRA at the same rank (MMD)", "default, r=8", avg, "align mmd", "lora"),
    ("Align-LoRA", "beats LoRA at the same rank (KL)", "interference, r=2", avg, "i align", "i lora r2"),
    ("Align-LoRA", "beats LoRA at the same rank (MMD)", "interference, r=2", avg, "i align mmd", "i lora r2"),
    ("MT-CRL", "raises task B's (has7's) shifted accuracy over plain multi-task LoRA", "default, r=8",
     shifted_b, "spurious", "lora"),
    ("MT-CRL", "ablation: one module (IRMv1 through a gate) also does", "default", shifted_b,
     "spurious K=1", "lora"),
    ("MT-CRL", "ablation: its modules and graph add to IRMv1 through a gate (K=4 vs K=1)", "default",
     shifted_b, "spurious", "spurious K=1"),
    ("MT-CRL", "ablation: without decorrelation it still does", "default", shifted_b, "spurious no decorr", "lora"),
    ("MT-CRL", "ablation: without sparsity it still does", "default", shifted_b, "spurious no sparsity", "lora"),
    ("MT-CRL", "ablation: with environments for every task (random ones for the others) it still does",
     "default", shifted_b, "spurious envs all", "lora"),
    ("MT-CRL", "ours: environments for has7 only (-1, none, elsewhere) beat random ones for every task",
     "default", shifted_b, "spurious", "spurious envs all"),
]
METRIC = {avg: "mean test accuracy over the tasks, %", shifted_b: "has7 shifted, %",
          head_sim: "median head cosine"}


def verdict(d, margin, competitive=False):
    mean = sum(d) / len(d)
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.inf
    if competitive:                                    # a is not worse than b by more than the margin
        if mean - 2 * se > -margin:
            return "holds here"
        return "does not hold here" if mean + 2 * se < -margin else "cannot tell (spread too wide)"
    if mean - 2 * se > 0 and mean > margin:
        return "holds here"
    if mean + 2 * se < margin:
        return "does not hold here"
    return "cannot tell (spread too wide)"


def fmt(xs, digits=1):
    m = sum(xs) / len(xs)
    return f"{m:.{digits}f} ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else f"{m:.{digits}f}"


def claims_table(results):
    lines = ["| paper | claim | our setting | measure | result (mean ± std over seeds) | verdict |",
             "|---|---|---|---|---|---|"]
    for paper, claim, setting, metric, a, b in CLAIMS:
        xa, competitive = [metric(m) for m in results[a]], isinstance(b, str) and b.startswith("~")
        b = b.lstrip("~") if competitive else b
        if isinstance(b, float):
            d, digits, margin = [x - b for x in xa], 3, 0.0
            result = f"{fmt(xa, 3)} (threshold {b})"
        else:
            xb = [metric(m) for m in results[b]]
            d, digits, margin = [x - y for x, y in zip(xa, xb)], 1, 0.5
            result = f"{a}: {fmt(xa)} vs {b}: {fmt(xb)}; difference {fmt(d)}"
        lines.append(f"| {paper} | {claim} | {setting} | {METRIC[metric]} | {result} "
                     f"| {verdict(d, margin, competitive)} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default="out", help="train.py's --out")
    p.add_argument("--base", default=os.path.join("out", "base.pt"), help="train.py's --base")
    args = p.parse_args()
    t0 = time.perf_counter()
    runner = compare.Runner(["--out", args.out, "--base", args.base], [], range(args.seeds),
                            len(RUNS) * args.seeds)
    results = {label: runner(label, flags + ["--suite", suite]) for label, (suite, flags) in RUNS.items()}
    table = claims_table(results)
    with open(os.path.join(args.out, "claims.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "claims.json"), "w") as f:
        json.dump(dict(results=results, runs=RUNS), f, indent=1)
    print(f"\n{table}\n\n{(time.perf_counter() - t0) / 60:.1f} min; wrote {args.out}/claims.md, claims.json;"
          " pictures: python benchmarks/figures.py")


if __name__ == "__main__":
    main()
