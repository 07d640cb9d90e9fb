"""Each paper's headline claim, tested on our benchmark: one table row per claim, with a verdict.

    python benchmarks/claims.py                   # every row: both regimes and the controls
                                                  # (about 10 hours; the plan is printed first)
    python benchmarks/claims.py --regime finite --jobs 2   # finite training sets only (about
                                                            # 2.2 hours on 2 cores)
    python benchmarks/claims.py --regime controls --jobs 2  # each verdict's controls (about
                                                             # 3 hours on 2 cores)
    python benchmarks/figures.py                  # the pictures, from the results this writes

Two regimes, and their controls: "unlimited" (a fresh batch every step, the default of train.py: no
sample is seen twice, so nothing can be overfit) and "finite" (--train-samples: a fixed training
set per task, drawn from again and again, where a generalization gap can open); every row names its
size.
The controls (finite regime) ask why each verdict holds: every method against LoRA at the same
dropout and at its best dropout chosen on validation, each task trained alone, the ablation that
removes each method's key ingredient, Align-LoRA's weight swept, and a related-task suite.

Every claim compares two settings over the same seeds (3 by default). A run is train.py's run()
on its default 1000 steps; finished runs (also compare.py's) are reused, so an interrupted claims
run continues where it stopped. The verdict takes the per-seed differences d (same seed, same data
and init stream): "holds here" when mean(d) - 2 se > 0 and mean(d) > 0.5 points; "does not hold
here" when mean(d) + 2 se < 0.5 points (no gain worth the name, or a loss); else "cannot tell
(spread too wide)"; se = std(d) / sqrt(seeds). Threshold claims (head similarity above 0.85) use
the per-seed values minus the threshold the same way, without the 0.5 margin. "Competitive"
claims (a is not worse than b) hold when mean(d) - 2 se > -0.5 points and do not hold when
mean(d) + 2 se < -0.5 points.
Writes <out>/claims.md (the table) and <out>/claims.json (every run's metrics, for the figures);
with --regime unlimited, finite or controls, claims-<regime>.md and .json.
"""
import argparse
import concurrent.futures
import json
import math
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402
import train  # noqa: E402

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
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
    "i mlora offset": (I, ["--method", "multihead", "--no-router", "--init", "offset",
                           "--rank", "2"]),
    "i mtl": (I, ["--method", "mtl", "--rank", "2"]),
    "i mtl tau 0.5": (I, ["--method", "mtl", "--rank", "2", "--temperature", "0.5"]),
    "i align": (I, ["--method", "align", "--rank", "2"]),
    "i align mmd": (I, ["--method", "align", "--rank", "2", "--align-loss", "mmd"]),
}
SIZES, MID, LOW = [64, 256, 1024], 256, "inc"       # training samples per task (the probe's pick)
LOW_SIZES = "1024,inc=64"                           # one task with few samples among larger ones
FINITE = {   # label -> (suite, flags): the finite regime
    **{f"{kind} n{n}": (D, flags + ["--train-samples", str(n)]) for n in SIZES for kind, flags in [
        ("lora", ["--method", "lora"]), ("align", ["--method", "align"]),
        ("align l0.02", ["--method", "align", "--align-weight", "0.02"]),
        ("align mmd", ["--method", "align", "--align-loss", "mmd"])]},
    f"align mmd l0.02 n{MID}": (D, ["--method", "align", "--align-loss", "mmd", "--align-weight",
                                    "0.02", "--train-samples", str(MID)]),
    **{f"i {kind} n{MID}": (I, flags + ["--rank", "2", "--train-samples", str(MID)])
       for kind, flags in [("lora r2", ["--method", "lora"]), ("align", ["--method", "align"])]},
    **{f"{kind} n{MID}": (D, flags + ["--train-samples", str(MID)]) for kind, flags in [
        ("hydra", ["--method", "multihead"]), ("mlora", ["--method", "multihead", "--no-router"]),
        ("mtl", ["--method", "mtl"]), ("lora r16", ["--method", "lora", "--rank", "16"])]},
    **{f"{kind} low": (D, flags + ["--train-samples", LOW_SIZES]) for kind, flags in [
        ("lora", ["--method", "lora"]), ("hydra", ["--method", "multihead"]),
        ("mtl", ["--method", "mtl"]), ("align", ["--method", "align"])]},
    **{f"{kind} n1024": (D, flags + ["--train-samples", "1024"]) for kind, flags in [
        ("spurious", ["--method", "spurious"]),
        ("spurious derived", ["--method", "spurious", "--env-source", "derived"])]},
}


def avg(m, split="test"):
    tasks = train.SUITES[m["suite"]]
    return sum(m["accuracy"][split][t] for t in tasks) / len(tasks) * 100


def shifted_b(m):
    return m["accuracy"]["shift"]["has7"] * 100


def acc_of(task):
    """The metric: one task's accuracy, %."""
    def metric(m, split="test"):
        return m["accuracy"][split][task] * 100
    METRIC[metric] = f"{task}'s test accuracy, %"
    return metric


def align_value(m):                  # L_align after training (KL unless the run used MMD)
    return m["learned"]["alignment_loss"]


def gap(m):                          # training-set minus test accuracy, mean over the tasks
    tasks = train.SUITES[m["suite"]]
    acc = m["accuracy"]
    return sum(acc["train"][t] - acc["test"][t] for t in tasks) / len(tasks) * 100


def head_sim(m):                     # median over layers of the mean pairwise cosine of the heads
    return statistics.median(v for v in m["learned"]["head_similarity"].values() if v is not None)


METRIC = {avg: "mean test accuracy over the tasks, %", shifted_b: "has7 shifted, %",
          head_sim: "median head cosine",
          gap: "training-set minus test accuracy, mean over the tasks, points"}
low_task = acc_of(LOW)

CLAIMS = [   # (paper, claim, our setting, metric, a, b or a threshold); "~b": a is competitive
            # with b; a tuple b: the best of these on validation
            # the unlimited regime: a fresh batch every step
    ("MTL-LoRA", "beats LoRA under task interference at about the same parameter count "
     "(tau 0.1, the authors')",
     "interference, r=2 (14.5k) vs LoRA r=4 (13.8k)", avg, "i mtl", "i lora r4"),
    ("MTL-LoRA", "the same with our earlier tau 0.5",
     "interference, r=2 (14.5k) vs LoRA r=4 (13.8k)", avg, "i mtl tau 0.5", "i lora r4"),
    ("MTL-LoRA", "beats LoRA at the same rank", "interference, r=2", avg, "i mtl", "i lora r2"),
    ("HydraLoRA", "beats LoRA at the same rank", "interference, r=2", avg, "i hydra", "i lora r2"),
    ("HydraLoRA", "beats LoRA at the same parameter count",
     "interference, r=2 (19.0k) vs LoRA r=6 (20.7k)",
     avg, "i hydra", "i lora r6"),
    ("HydraLoRA", "beats LoRA at the same rank", "default, r=8", avg, "hydra", "lora"),
    ("Align-LoRA", "M-LoRA's heads end up highly similar (median cosine > 0.85), zero init",
     "interference, r=2", head_sim, "i mlora", 0.85),
    ("Align-LoRA", "the same with the paper's offset init", "interference, r=2", head_sim,
     "i mlora offset", 0.85),
    ("Align-LoRA", "the same with the paper's offset init", "default, r=8", head_sim,
     "mlora offset", 0.85),
    ("Align-LoRA", "M-LoRA beats the routed HydraLoRA, zero init", "interference, r=2", avg,
     "i mlora", "i hydra"),
    ("Align-LoRA", "M-LoRA beats the routed HydraLoRA, offset init", "interference, r=2", avg,
     "i mlora offset", "i hydra"),
    ("Align-LoRA", "M-LoRA beats the routed HydraLoRA, offset init", "default, r=8", avg,
     "mlora offset", "hydra"),
    ("Align-LoRA", "one LoRA of higher rank is competitive with multi-head LoRA at equal "
     "parameters (LoRA r=4 vs M-LoRA)", "interference, 13.8k each", avg, "i lora r4",
     "~i mlora offset"),
    ("Align-LoRA", "the same, LoRA r=6 vs HydraLoRA", "interference, 20.7k vs 19.0k", avg,
     "i lora r6", "~i hydra"),
    ("Align-LoRA", "the same, LoRA r=24 vs HydraLoRA", "default, 82.9k vs 60.5k", avg, "lora r24",
     "~hydra"),
    ("Align-LoRA", "beats LoRA at the same rank (KL)", "default, r=8", avg, "align", "lora"),
    ("Align-LoRA", "beats LoRA at the same rank (MMD)", "default, r=8", avg, "align mmd", "lora"),
    ("Align-LoRA", "beats LoRA at the same rank (KL)", "interference, r=2", avg, "i align",
     "i lora r2"),
    ("Align-LoRA", "beats LoRA at the same rank (MMD)", "interference, r=2", avg, "i align mmd",
     "i lora r2"),
    ("MT-CRL", "raises task B's (has7's) shifted accuracy over plain multi-task LoRA",
     "default, r=8",
     shifted_b, "spurious", "lora"),
    ("MT-CRL", "ablation: one module (IRMv1 through a gate) also does", "default", shifted_b,
     "spurious K=1", "lora"),
    ("MT-CRL", "ablation: its modules and graph add to IRMv1 through a gate (K=4 vs K=1)",
     "default",
     shifted_b, "spurious", "spurious K=1"),
    ("MT-CRL", "ablation: without decorrelation it still does", "default", shifted_b,
     "spurious no decorr", "lora"),
    ("MT-CRL", "ablation: without sparsity it still does", "default", shifted_b,
     "spurious no sparsity", "lora"),
    ("MT-CRL", "ablation: with environments for every task (random ones for the others) "
     "it still does",
     "default", shifted_b, "spurious envs all", "lora"),
    ("MT-CRL", "ours: environments for has7 only (-1, none, elsewhere) beat random ones for "
     "every task",
     "default", shifted_b, "spurious", "spurious envs all"),
]
CLAIMS_FINITE = [   # the same, on finite training sets (train.py --train-samples)
    *[("Align-LoRA", f"beats LoRA at the same rank ({kind}{w}): better generalization",
       f"default, r=8, {n} per task", avg, f"align{label} n{n}", f"lora n{n}")
      for kind, w, label, sizes in [("KL", ", lambda 0.2", "", SIZES),
                                    ("KL", ", lambda 0.02", " l0.02", SIZES),
                                    ("MMD", ", lambda 0.2", " mmd", SIZES),
                                    ("MMD", ", lambda 0.02", " mmd l0.02", [MID])] for n in sizes],
    ("Align-LoRA", "beats LoRA at the same rank (KL, lambda 0.2)",
     f"interference, r=2, {MID} per task",
     avg, f"i align n{MID}", f"i lora r2 n{MID}"),
    ("Align-LoRA", "narrows the train-test gap (KL, lambda 0.2)", f"default, r=8, {MID} per task",
     gap, f"lora n{MID}", f"align n{MID}"),
    ("HydraLoRA", "beats LoRA at the same rank", f"default, r=8, {MID} per task", avg,
     f"hydra n{MID}", f"lora n{MID}"),
    ("HydraLoRA", "beats LoRA at about the same parameter count", f"default, r=8 (60.5k) vs LoRA "
     f"r=16 (55.3k), {MID} per task", avg, f"hydra n{MID}", f"lora r16 n{MID}"),
    ("Align-LoRA", "M-LoRA beats LoRA at the same parameter count", f"default, r=8 vs LoRA r=16 "
     f"(55.3k each), {MID} per task", avg, f"mlora n{MID}", f"lora r16 n{MID}"),
    ("MTL-LoRA", "beats LoRA at about the same parameter count", f"default, r=8 (60.1k) vs LoRA "
     f"r=16 (55.3k), {MID} per task", avg, f"mtl n{MID}", f"lora r16 n{MID}"),
    *[(paper, f"helps the low-resource task more than LoRA ({what})",
       f"default, r=8, {LOW} 64, the others 1024", low_task, f"{label} low", "lora low")
      for paper, what, label in [("HydraLoRA", "divide, routed", "hydra"),
                                 ("MTL-LoRA", "divide per task", "mtl"),
                                 ("Align-LoRA", "align: KL, lambda 0.2", "align")]],
    ("MT-CRL", "raises has7's shifted accuracy over LoRA (annotated environments)",
     "default, r=8, 1024 per task", shifted_b, "spurious n1024", "lora n1024"),
    ("MT-CRL", "the same with environments derived from first_ge5's label (no annotation)",
     "default, r=8, 1024 per task", shifted_b, "spurious derived n1024", "lora n1024"),
    ("MT-CRL", "derived environments do as well as annotated ones", "default, r=8, 1024 per task",
     shifted_b, "spurious derived n1024", "~spurious n1024"),
]

# The controls: each verdict against a fair baseline (the same dropout, and LoRA at its best
# dropout chosen on the validation draw), each task alone, the ablation behind each win, and a
# suite of related tasks. Runs: label -> (suite, flags, seeds); 5 seeds where the spread is wide.
R, REL_LOW, REL_SIZES = "related", "sort_high", "1024,sort_high=64"   # sort on 0-9, 0-4, 5-9
DROPOUTS = [("", []), (" d0.1", ["--dropout", "0.1"])]
LORA, MTL, HYDRA = ["--method", "lora"], ["--method", "mtl"], ["--method", "multihead"]
ALIGN, MMD = ["--method", "align"], ["--method", "align", "--align-loss", "mmd"]
LOW_FLAGS, REL_FLAGS = ["--train-samples", LOW_SIZES], ["--train-samples", REL_SIZES]
CONTROLS = {
    **{f"{k} low{d}": (D, f + LOW_FLAGS + df, n) for d, df in DROPOUTS for k, f, n in [
        ("lora", LORA, 5), ("mtl", MTL, 5), ("align", ALIGN, 5), ("hydra", HYDRA, 3)]},
    "mtl low shared-id": (D, MTL + ["--shared-id"] + LOW_FLAGS, 5),
    "mtl low Lam=I": (D, MTL + ["--task-transform", "identity"] + LOW_FLAGS, 3),
    "mtl low n=1": (D, MTL + ["--n-up", "1"] + LOW_FLAGS, 3),
    "lora-split r16 low": (D, MTL + ["--n-up", "1", "--task-transform", "split", "--rank", "16"]
                           + LOW_FLAGS, 3),
    **{f"lora low alone {t}": (D, LORA + ["--tasks", t] + LOW_FLAGS, 3) for t in train.SUITES[D]},
    **{f"align low w{w}": (D, ALIGN + ["--align-weight", w] + LOW_FLAGS, 3)
       for w in ["0", "0.002", "0.02", "2"]},
    **{f"r {k}{d}": (R, f + REL_FLAGS + df, n) for d, df in DROPOUTS for k, f, n in [
        ("lora", LORA, 5), ("align", ALIGN, 5),
        ("align l0.02", ALIGN + ["--align-weight", "0.02"], 5),
        ("align mmd", MMD, 3), ("mtl", MTL, 5), ("hydra", HYDRA, 3)]},
    **{f"r align w{w}": (R, ALIGN + ["--align-weight", w] + REL_FLAGS, 3)
       for w in ["0", "0.002", "2"]},
    **{f"r lora alone {t}": (R, LORA + ["--tasks", t] + REL_FLAGS, 5 if t == REL_LOW else 3)
       for t in train.SUITES[R]},
    **{f"{k} n4096": (D, f + ["--train-samples", "4096"], 3) for k, f in [
        ("lora", LORA), ("spurious", ["--method", "spurious"]),
        ("spurious no-IRM", ["--method", "spurious", "--invariance-weight", "0"])]},
}
SWEEPS = {   # Align-LoRA's weight lambda -> the run; accuracy and the final L_align of each
    "default, inc 64 among 1024": {0: "align low w0", 0.002: "align low w0.002",
                                   0.02: "align low w0.02", 0.2: "align low", 2: "align low w2"},
    "related, sort_high 64 among 1024": {0: "r align w0", 0.002: "r align w0.002",
                                         0.02: "r align l0.02", 0.2: "r align", 2: "r align w2"}}
LOW_BARS = ["lora low", "lora low d0.1", "lora low alone inc", "mtl low", "mtl low d0.1",
            "mtl low shared-id", "mtl low Lam=I", "mtl low n=1", "lora-split r16 low", "hydra low",
            "hydra low d0.1", "align low", "align low d0.1"]     # the picture of inc, per run
LOW_SET = f"default, r=8, {LOW} 64, the others 1024"
REL_SET = f"related, r=8, {REL_LOW} 64, the others 1024"
rel_low = acc_of(REL_LOW)
BEST = {D: ("lora low", "lora low d0.1"), R: ("r lora", "r lora d0.1")}   # chosen on validation
DIVIDE = [("MTL-LoRA", "divide per task", "mtl"), ("HydraLoRA", "divide, routed; its router "
          "against the heads averaged, which is LoRA (equal heads get equal gradients)", "hydra"),
          ("Align-LoRA", "align: KL, lambda 0.2", "align")]
CLAIMS_CONTROLS = [
    ("LoRA", "dropout 0.1 helps the low-resource task (a standard regularizer)", LOW_SET, low_task,
     "lora low d0.1", "lora low"),
    *[(paper, f"helps the low-resource task more than LoRA at the same dropout {d or '0'} ({what})",
       LOW_SET, low_task, f"{k} low{d and ' d0.1'}", f"lora low{d and ' d0.1'}")
      for paper, what, k in DIVIDE for d in ["", "0.1"]],
    *[(paper, f"helps the low-resource task more than LoRA at its best dropout, at dropout "
       f"{d or '0'} ({what.split(';')[0]})", LOW_SET, low_task, f"{k} low{d and ' d0.1'}", BEST[D])
      for paper, what, k in DIVIDE for d in ["", "0.1"]],
    ("MTL-LoRA", "ablation: its gain needs task ids (one shared id for every sample)", LOW_SET,
     low_task, "mtl low", "mtl low shared-id"),
    ("MTL-LoRA", "ablation: its gain needs learned task transforms (Lam_t frozen at I)", LOW_SET,
     low_task, "mtl low", "mtl low Lam=I"),
    ("MTL-LoRA", "ablation: its gain needs several up-projections (n=1)", LOW_SET, low_task,
     "mtl low", "mtl low n=1"),
    *[(paper, f"beats LoRA-Split (4 LoRAs of rank 4, one per task: 55.3k) at about equal "
       f"parameters ({k}: 60k)", LOW_SET, metric, f"{k} low", "lora-split r16 low")
      for paper, k in [("MTL-LoRA", "mtl"), ("HydraLoRA", "hydra")] for metric in [low_task, avg]],
    *[("multi-task", f"training {t} with the other tasks beats training it alone (transfer)",
       f"{LOW_SET}; {t} alone sees the same samples", acc_of(t), "lora low", f"lora low alone {t}")
      for t in train.SUITES[D]],
    *[("multi-task", f"training {t} with the other tasks beats training it alone (transfer)",
       f"{REL_SET}; {t} alone sees the same samples", acc_of(t), "r lora", f"r lora alone {t}")
      for t in train.SUITES[R]],
    *[(paper, f"beats LoRA on related tasks at the same dropout {d or '0'} ({what})", REL_SET,
       metric, f"r {k}{d and ' d0.1'}", f"r lora{d and ' d0.1'}")
      for paper, what, k in [("Align-LoRA", "KL, lambda 0.2", "align"),
                             ("Align-LoRA", "KL, lambda 0.02", "align l0.02"),
                             ("Align-LoRA", "MMD, lambda 0.2", "align mmd"),
                             ("MTL-LoRA", "divide per task", "mtl"),
                             ("HydraLoRA", "divide, routed", "hydra")]
      for d in ["", "0.1"] for metric in [rel_low, avg]],
    *[(paper, f"beats LoRA on related tasks at its best dropout, at dropout {d or '0'} ({what})",
       REL_SET, rel_low, f"r {k}{d and ' d0.1'}", BEST[R])
      for paper, what, k in [("Align-LoRA", "KL, lambda 0.2", "align"),
                             ("Align-LoRA", "KL, lambda 0.02", "align l0.02")]
      for d in ["", "0.1"]],
    ("MT-CRL", "raises has7's shifted accuracy over LoRA with more data", "default, r=8, 4096 per "
     "task", shifted_b, "spurious n4096", "lora n4096"),
    ("MT-CRL", "ablation: its gain needs the IRM penalty (weight 0)", "default, r=8, 4096 per task",
     shifted_b, "spurious n4096", "spurious no-IRM n4096"),
]


def verdict(d, margin, competitive=False):
    mean = sum(d) / len(d)
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.inf
    if competitive:                           # a is not worse than b by more than the margin
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
    if len(xs) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def claims_table(results, claims=CLAIMS):
    lines = ["| paper | claim | our setting | measure | result (mean ± std over seeds) "
             "| verdict |",
             "|---|---|---|---|---|---|"]
    for paper, claim, setting, metric, a, b in claims:
        xa, competitive = [metric(m) for m in results[a]], isinstance(b, str) and b.startswith("~")
        b = b.lstrip("~") if competitive else b
        chosen = ""
        if isinstance(b, tuple):                  # LoRA at its best: the best mean on validation
            chosen = f" (the best on validation of {' and '.join(b)})"
            b = max(b, key=lambda k: statistics.mean(metric(m, "val") for m in results[k]))
        if isinstance(b, float):
            d, margin = [x - b for x in xa], 0.0
            result = f"{fmt(xa, 3)} (threshold {b})"
        else:                                     # paired by seed, on the seeds both have
            of_b = {m["seed"]: metric(m) for m in results[b]}
            pairs = [(x, of_b[m["seed"]]) for x, m in zip(xa, results[a]) if m["seed"] in of_b]
            n = len(pairs)
            seeds = "" if n == len(xa) == len(of_b) else f" (the {n} seeds of both)"
            xa, xb = [x for x, _ in pairs], [y for _, y in pairs]
            d, margin = [x - y for x, y in pairs], 0.5
            result = f"{a}: {fmt(xa)} vs {b}{chosen}: {fmt(xb)}; difference {fmt(d)}{seeds}"
        lines.append(f"| {paper} | {claim} | {setting} | {METRIC[metric]} | {result} "
                     f"| {verdict(d, margin, competitive)} |")
    return "\n".join(lines)


def low_of(label):                   # the low-resource task's metric of a controls run
    return acc_of(REL_LOW if label.startswith("r ") else LOW)


def sweep_table(results, sweeps=SWEEPS, low_of=low_of, avg=avg):
    """Align-LoRA's weight against accuracy and the alignment loss left after training."""
    lines = ["| suite | lambda | mean test accuracy, % | low-resource task, % "
             "| final L_align (KL) | seeds |", "|---|---|---|---|---|---|"]
    for suite, by_weight in sweeps.items():
        for w, label in by_weight.items():
            rs, low = results[label], low_of(label)
            lines.append(f"| {suite} | {w:g} | {fmt([avg(m) for m in rs])} | "
                         f"{fmt([low(m) for m in rs])} | {fmt([align_value(m) for m in rs], 3)} | "
                         f"{len(rs)} |")
    return "\n".join(lines)


COST = {"none": 0.1, "full": 0.9, "lora": 1.0, "multihead": 1.5, "mtl": 1.3, "align": 1.2,
        "spurious": 1.1}      # a run's time in one-thread LoRA runs (about 2 min each, 2 at a time)


def plan(runs, seeds, common):
    """The runs not yet finished, (what, train.py's argv), and their time in LoRA runs."""
    todo, cost = [], 0.0
    for label, (suite, flags, n) in runs.items():
        for seed in range(seeds or n):
            argv = common + flags + ["--suite", suite, "--seed", str(seed)]
            args = train.get_args(argv)
            folder = os.path.join(args.out, args.name)
            if not os.path.exists(os.path.join(folder, "metrics.json")):
                resume = ["--resume"] if os.path.exists(os.path.join(folder, "ckpt.pt")) else []
                todo.append((f"{label}, seed {seed}", argv + resume))
                mmd = args.method == "align" and args.align_loss == "mmd"
                share = len(args.tasks) / len(train.SUITES[suite]) if args.tasks else 1
                cost += (3.0 if mmd else COST[args.method]) * share
    return todo, cost


def prerun(todo, jobs, script=TRAIN):
    """Train the runs `jobs` at a time, each a `script` process (train.py) on one thread (on a
    2-core CPU, two one-thread runs do 1.4x the steps of one two-thread run; a run's last digits
    depend on its thread count). The runner then reads them back as finished runs."""
    env, t0 = dict(os.environ, OMP_NUM_THREADS="1"), time.perf_counter()

    def one(item):
        what, argv = item
        res = subprocess.run([sys.executable, script] + argv, env=env, capture_output=True,
                             text=True)
        if res.returncode:
            raise SystemExit(f"{what} failed:\n{res.stderr[-2000:]}")
        print(f"done: {what} ({(time.perf_counter() - t0) / 60:.1f} min so far)", flush=True)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, todo))


def runs_for(rows):
    """{label: (suite, flags, seeds)} of the runs that the tables `rows` ({regime: claims}) use:
    3 seeds each, the controls' own counts where the controls are asked for (so with --regime
    all, the low-resource runs that the finite rows share with the controls count 5 seeds)."""
    every = {k: (suite, flags, 3) for k, (suite, flags) in (RUNS | FINITE).items()}
    every |= CONTROLS if "controls" in rows else {}
    used = {label for claims in rows.values() for row in claims
            for label in [row[4], *(row[5] if isinstance(row[5], tuple) else [row[5]])]
            if isinstance(label, str)}
    used |= {label for by_weight in SWEEPS.values() for label in by_weight.values()} \
        if "controls" in rows else set()
    return {k: v for k, v in every.items() if k in {u.lstrip("~") for u in used}}


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", default="all", choices=["all", "unlimited", "finite", "controls"])
    p.add_argument("--seeds", type=compare.positive, help="seeds per setting (default: 3; the "
                   "controls' low-resource and related-suite settings 5)")
    p.add_argument("--jobs", type=compare.positive, default=1,
                   help="runs at a time, one thread each (default: one, in this process)")
    p.add_argument("--out", default="out", help="train.py's --out")
    p.add_argument("--base", help="train.py's --base (default: <out>/base.pt)")
    args = p.parse_args()
    t0 = time.perf_counter()
    rows = {"unlimited": CLAIMS, "finite": CLAIMS_FINITE, "controls": CLAIMS_CONTROLS}
    rows = rows if args.regime == "all" else {args.regime: rows[args.regime]}
    runs = runs_for(rows)
    common = ["--out", args.out] + (["--base", args.base] if args.base else [])
    todo, cost = plan(runs, args.seeds, common)
    total = sum(args.seeds or n for _, _, n in runs.values())
    print(f"{total} runs, {len(todo)} to train: "
          f"about {cost * 2 / args.jobs / 60:.1f} h at --jobs {args.jobs} on a 2-core CPU "
          f"({cost:.0f} one-thread LoRA runs of about 2 min)", flush=True)
    runner = compare.Runner(common, [], range(args.seeds or 3), total)
    if args.jobs > 1:
        prerun(todo, args.jobs)
    results = {label: runner(label, flags + ["--suite", suite], range(args.seeds or n))
               for label, (suite, flags, n) in runs.items()}
    tables = [f"{regime}:\n\n" + claims_table(results, claims) for regime, claims in rows.items()]
    if "controls" in rows:
        tables.append("Align-LoRA's weight (controls):\n\n" + sweep_table(results))
    table = "\n\n".join(tables)
    name = "claims" if args.regime == "all" else f"claims-{args.regime}"
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump(dict(results=results, runs=runs, sweeps=SWEEPS, low=LOW_BARS), f, indent=1)
    print(f"\n{table}\n\n{(time.perf_counter() - t0) / 60:.1f} min; wrote {args.out}/{name}.md, "
          f"{name}.json; pictures: python benchmarks/figures.py")


if __name__ == "__main__":
    main()
