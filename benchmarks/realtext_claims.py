"""The controls of claims.py, on real text: MiniLM and three suites (benchmarks/realtext.py).

    bash benchmarks/setup_realtext.sh
    python benchmarks/realtext_claims.py --jobs 2          # the plan is printed first
    python benchmarks/realtext_claims.py --plan            # only the plan

Every row is claims.py's: two settings over the same seeds, paired by seed, with its verdict
rule (claims.verdict: "holds here" when mean(d) - 2 se > 0 and mean(d) > 0.5 points, "does not
hold here" when mean(d) + 2 se < 0.5, else "cannot tell"; "~": a is competitive with b). The
settings, each a realtext.py run (150 steps of 16 texts, 48 tokens at most, r=8 on all 36
linear layers): every method at LoRA dropout 0 and 0.1 against LoRA at the same dropout and at
its best dropout chosen on validation; each task alone on the same samples; LoRA-Split (one LoRA
of rank 4 per task) and a LoRA of rank 16, both about the size of the divided adapters;
MTL-LoRA with one shared id; Align-LoRA's weight at 0, 0.02 and 0.2 with its final L_align;
HydraLoRA's routing per task; MT-CRL without its IRM penalty; full fine-tuning and the frozen
base with heads only. The low-resource variants train one task on 64 texts and the others on
1000 (party: its 652). Finished runs are reused, so an interrupted table continues.
Writes <out>/realtext-claims.md and .json.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import claims  # noqa: E402
import compare  # noqa: E402
import realtext  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "realtext.py")
U, S, H = "unrelated", "domains", "heldout"
LOW = {U: "sentiment", S: "movies"}
SIZES = {U: "1000,sentiment=64,party=652", S: "1000,movies=64", H: "1000"}
PREFIX = {U: "u", S: "s", H: "h"}
LORA, MTL, HYDRA = ["--method", "lora"], ["--method", "mtl"], ["--method", "multihead"]
MLORA, ALIGN = HYDRA + ["--no-router"], ["--method", "align"]
SPLIT = MTL + ["--n-up", "1", "--task-transform", "split", "--rank", "16"]
D01 = ["--dropout", "0.1"]


def runs_of(suite, spec):
    """{label: (flags, seeds)} from [(kind, flags, seeds)], at d0 and, where asked, d0.1."""
    p, out = PREFIX[suite], {}
    for kind, flags, seeds, both in spec:
        base = flags + ["--suite", suite, "--train-samples", SIZES[suite]]
        out[f"{p} {kind}"] = (base, seeds)
        if both:
            out[f"{p} {kind} d0.1"] = (base + D01, seeds)
    return out


RUNS = {
    **runs_of(U, [("lora", LORA, 5, True), ("mtl", MTL, 5, True), ("align", ALIGN, 5, True),
                  ("hydra", HYDRA, 3, True), ("mlora", MLORA, 3, True),
                  ("align mmd", ALIGN + ["--align-loss", "mmd"], 3, False),
                  ("align w0", ALIGN + ["--align-weight", "0"], 3, False),
                  ("align w0.02", ALIGN + ["--align-weight", "0.02"], 3, False),
                  ("mtl shared-id", MTL + ["--shared-id"], 3, False),
                  ("lora-split r16", SPLIT, 3, False), ("lora r16", LORA + ["--rank", "16"], 3,
                                                        False),
                  ("full", ["--method", "full"], 3, False), ("none", ["--method", "none"], 3,
                                                             False),
                  *[(f"lora alone {t}", LORA + ["--tasks", t], 5 if t == LOW[U] else 3, False)
                    for t in realtext.SUITES[U]]]),
    **runs_of(S, [("lora", LORA, 5, True), ("align", ALIGN, 5, True),
                  ("align w0", ALIGN + ["--align-weight", "0"], 3, False),
                  ("align w0.02", ALIGN + ["--align-weight", "0.02"], 3, False),
                  ("align mmd", ALIGN + ["--align-loss", "mmd"], 3, False),
                  ("mtl", MTL, 3, False), ("hydra", HYDRA, 3, False), ("mlora", MLORA, 3, False),
                  ("full", ["--method", "full"], 3, False), ("none", ["--method", "none"], 3,
                                                             False),
                  *[(f"lora alone {t}", LORA + ["--tasks", t], 5 if t == LOW[S] else 3, False)
                    for t in realtext.SUITES[S]]]),
    **runs_of(H, [("lora", LORA, 5, False), ("spurious", ["--method", "spurious"], 5, False),
                  ("spurious no-IRM", ["--method", "spurious", "--invariance-weight", "0"], 3,
                   False),
                  ("spurious w10", ["--method", "spurious", "--invariance-weight", "10"], 3,
                   False),
                  ("align", ALIGN, 3, False), ("mtl", MTL, 3, False),
                  ("mtl shared-id", MTL + ["--shared-id"], 3, False), ("hydra", HYDRA, 3, False),
                  ("mlora", MLORA, 3, False), ("full", ["--method", "full"], 3, False),
                  ("none", ["--method", "none"], 3, False)]),
}


def acc_of(task, what=None):
    """The metric: one task's accuracy, %."""
    def metric(m, split="test"):
        return m["accuracy"][split][task] * 100
    claims.METRIC[metric] = what or f"{task}'s test accuracy, %"
    return metric


def avg(m, split="test"):
    tasks = realtext.SUITES[m["suite"]]
    return sum(m["accuracy"][split][t] for t in tasks) / len(tasks) * 100


def seen(m, split="test"):                         # heldout: the validation of the seen domains
    return avg(m, split)


claims.METRIC[avg] = "mean test accuracy over the suite's tasks, %"
u_low, s_low = acc_of(LOW[U]), acc_of(LOW[S])
unseen = acc_of("movies", "movies' test accuracy (never trained on), mean over the 3 ids, %")
SET = {U: "unrelated, r=8, sentiment 64, the others 1000", S: "domains, r=8, movies 64, the "
       "others 1000", H: "heldout: tweets, amazon, nyt 1000 each; movies unseen"}
BEST = {s: (f"{PREFIX[s]} lora", f"{PREFIX[s]} lora d0.1") for s in (U, S)}
DIVIDE = [("MTL-LoRA", "divide per task", "mtl"), ("HydraLoRA", "divide, routed", "hydra"),
          ("Align-LoRA", "M-LoRA: divide, averaged", "mlora"),
          ("Align-LoRA", "align: KL, lambda 0.2", "align")]


def low_rows(suite, metric, divide):
    p, out = PREFIX[suite], []
    if suite == U:
        out.append(("LoRA", "dropout 0.1 helps the low-resource task", SET[U], metric,
                    f"{p} lora d0.1", f"{p} lora"))
    for paper, what, k in divide:
        for d in ["", " d0.1"]:
            if f"{p} {k}{d}" in RUNS:
                out.append((paper, f"helps the low-resource task more than LoRA at the same "
                            f"dropout {d.strip(' d') or '0'} ({what})", SET[suite], metric,
                            f"{p} {k}{d}", f"{p} lora{d}"))
                out.append((paper, f"helps the low-resource task more than LoRA at its best "
                            f"dropout, at dropout {d.strip(' d') or '0'} ({what})", SET[suite],
                            metric, f"{p} {k}{d}", BEST[suite]))
    return out


CLAIMS = [
    *low_rows(U, u_low, DIVIDE),
    ("MTL-LoRA", "ablation: its gain needs task ids (one shared id)", SET[U], u_low, "u mtl",
     "u mtl shared-id"),
    *[(paper, "beats LoRA-Split (4 LoRAs of rank 4, one per task) at about equal parameters",
       SET[U], metric, f"u {k}", "u lora-split r16") for paper, k in [("MTL-LoRA", "mtl"),
                                                                       ("HydraLoRA", "hydra")]
      for metric in (u_low, avg)],
    *[("Align-LoRA", f"one LoRA of higher rank (r=16) is competitive with {name} at about "
       "equal parameters", SET[U], avg, "u lora r16", f"~u {k}")
      for name, k in [("MTL-LoRA", "mtl"), ("HydraLoRA", "hydra"), ("M-LoRA", "mlora")]],
    ("Align-LoRA", "beats LoRA at the same rank (MMD, lambda 0.2)", SET[U], u_low,
     "u align mmd", "u lora"),
    *[("multi-task", f"training {t} with the other tasks beats training it alone (transfer)",
       f"{SET[U]}; {t} alone sees the same samples", acc_of(t), "u lora", f"u lora alone {t}")
      for t in realtext.SUITES[U]],
    ("LoRA", "adapters beat the frozen base with heads only", SET[U], avg, "u lora", "u none"),
    ("LoRA", "is competitive with full fine-tuning", SET[U], avg, "u lora", "~u full"),
    *[(paper, f"beats LoRA on one skill across domains at the same dropout {d or '0'} ({what})",
       SET[S], metric, f"s {k}{d and ' d0.1'}", f"s lora{d and ' d0.1'}")
      for paper, what, k, ds in [("Align-LoRA", "KL, lambda 0.2", "align", ["", "0.1"]),
                                 ("Align-LoRA", "KL, lambda 0.02", "align w0.02", [""]),
                                 ("Align-LoRA", "MMD, lambda 0.2", "align mmd", [""]),
                                 ("MTL-LoRA", "divide per task", "mtl", [""]),
                                 ("HydraLoRA", "divide, routed", "hydra", [""]),
                                 ("Align-LoRA", "M-LoRA: divide, averaged", "mlora", [""])]
      for d in ds for metric in (s_low, avg)],
    *[("Align-LoRA", f"beats LoRA on one skill across domains at its best dropout, at dropout "
       f"{d or '0'} (KL, lambda 0.2)", SET[S], s_low, f"s align{d and ' d0.1'}", BEST[S])
      for d in ["", "0.1"]],
    *[("multi-task", f"training {t} with the other domains beats training it alone (transfer)",
       f"{SET[S]}; {t} alone sees the same samples", acc_of(t), "s lora", f"s lora alone {t}")
      for t in realtext.SUITES[S]],
    ("LoRA", "adapters beat the frozen base with heads only", SET[S], avg, "s lora", "s none"),
    ("LoRA", "is competitive with full fine-tuning", SET[S], avg, "s lora", "~s full"),
    ("MT-CRL", "raises accuracy on an unseen domain over LoRA (environments: the domains)",
     SET[H], unseen, "h spurious", "h lora"),
    ("MT-CRL", "ablation: its gain needs the IRM penalty (weight 0)", SET[H], unseen,
     "h spurious", "h spurious no-IRM"),
    ("MT-CRL", "the same at train.py's invariance weight (10)", SET[H], unseen,
     "h spurious w10", "h lora"),
    *[(paper, f"generalizes to an unseen domain better than LoRA ({what})", SET[H], unseen,
       f"h {k}", "h lora") for paper, what, k in [
           ("Align-LoRA", "align: KL, lambda 0.2", "align"), ("MTL-LoRA", "divide per task",
                                                             "mtl"),
           ("HydraLoRA", "divide, routed", "hydra"), ("Align-LoRA", "M-LoRA", "mlora")]],
    ("MTL-LoRA", "ablation: its unseen-domain accuracy needs task ids (one shared id)", SET[H],
     unseen, "h mtl", "h mtl shared-id"),
    ("LoRA", "adapters beat the frozen base with heads only", SET[H], unseen, "h lora", "h none"),
    ("LoRA", "is competitive with full fine-tuning", SET[H], unseen, "h lora", "~h full"),
]
LOW_BARS = [f"{p} {k}" for p, ks in [
    ("u", ["none", "full", "lora", "lora d0.1", "lora alone sentiment", "lora r16", "mtl",
           "mtl d0.1", "mtl shared-id", "lora-split r16", "hydra", "mlora", "align", "align d0.1"]),
    ("s", ["none", "full", "lora", "lora d0.1", "lora alone movies", "mtl", "hydra", "align",
           "align d0.1", "align w0.02", "align mmd"]),
    ("h", ["none", "full", "lora", "mtl", "mtl shared-id", "hydra", "mlora", "align", "spurious",
           "spurious no-IRM", "spurious w10"])] for k in ks]     # the picture (figures.py)
SWEEPS = {SET[U]: {0: "u align w0", 0.02: "u align w0.02", 0.2: "u align"},
          SET[S]: {0: "s align w0", 0.02: "s align w0.02", 0.2: "s align"}}


LESSONS = [   # (the digit benchmark's lesson, its verdict there, the real-text row's a and b)
    ("LoRA dropout 0.1 helps a low-resource task", "holds here", "u lora d0.1", "u lora"),
    ("MTL-LoRA helps it more than LoRA, dropout 0", "holds here", "u mtl", "u lora"),
    ("the same at dropout 0.1", "holds here", "u mtl d0.1", "u lora d0.1"),
    ("the same against LoRA at its best dropout (MTL-LoRA at 0.1)", "holds here", "u mtl d0.1",
     BEST[U]),
    ("MTL-LoRA's gain needs the task ids (one shared id)", "holds here", "u mtl",
     "u mtl shared-id"),
    ("MTL-LoRA beats LoRA-Split at equal size", "does not hold here", "u mtl", "u lora-split r16"),
    ("HydraLoRA beats LoRA-Split at equal size", "does not hold here", "u hydra",
     "u lora-split r16"),
    ("HydraLoRA helps a low-resource task more than LoRA", "cannot tell (spread too wide)",
     "u hydra", "u lora"),
    ("a LoRA of higher rank is competitive with HydraLoRA at its size", "holds here",
     "u lora r16", "~u hydra"),
    ("Align-LoRA helps a low-resource task among unrelated ones, dropout 0",
     "does not hold here", "u align", "u lora"),
    ("the same at dropout 0.1", "does not hold here", "u align d0.1", "u lora d0.1"),
    ("the low-resource task gains from unrelated tasks (mix vs alone)", "does not hold here",
     "u lora", "u lora alone sentiment"),
    ("the low-resource task gains from related tasks (mix vs alone)", "holds here", "s lora",
     "s lora alone movies"),
    ("Align-LoRA beats LoRA on related tasks (KL 0.2, dropout 0)",
     "cannot tell (spread too wide)", "s align", "s lora"),
    ("the same at dropout 0.1", "cannot tell (spread too wide)", "s align d0.1", "s lora d0.1"),
    ("the same at KL 0.02, dropout 0", "cannot tell (spread too wide)", "s align w0.02",
     "s lora"),
    ("the same with MMD, dropout 0", "cannot tell (spread too wide)", "s align mmd", "s lora"),
    ("MTL-LoRA beats LoRA on related tasks", "does not hold here", "s mtl", "s lora"),
    ("HydraLoRA beats LoRA on related tasks", "does not hold here", "s hydra", "s lora"),
    ("MT-CRL beats LoRA where annotated environments differ", "holds here", "h spurious",
     "h lora"),
    ("MT-CRL's gain needs its IRM penalty", "holds here", "h spurious", "h spurious no-IRM"),
]


def agreement(digits, real):
    if "cannot tell" in digits or "cannot tell" in real:
        return "cannot tell"
    return "agree" if digits == real else "disagree"


def lessons_table(results):
    """Each lesson of the digit benchmark beside the same comparison on real text (the first
    row of CLAIMS with that a and b: the low-resource task's, or the unseen domain's)."""
    lines = ["| lesson (digits) | digits | real text (MiniLM) | real text: the runs | "
             "agree? |", "|---|---|---|---|---|"]
    for lesson, digits, a, b in LESSONS:
        row = next(r for r in CLAIMS if r[4] == a and r[5] == b)
        cells = claims.claims_table(results, [row]).splitlines()[-1].split(" | ")
        real = cells[-1].rstrip(" |")
        lines.append(f"| {lesson} | {digits} | {real} | {cells[-2]} | "
                     f"{agreement(digits, real)} |")
    return "\n".join(lines)


def low_of(label):                  # the low-resource task's metric of a run
    return u_low if label.startswith("u ") else s_low


def routing_table(results):
    """HydraLoRA's mean routing weight per task and head, over layers, tokens and seeds."""
    lines = []
    for label in [k for k in RUNS if k.split()[1] == "hydra"]:
        rs, tasks = results[label], realtext.SUITES[results[label][0]["suite"]]
        lines += [f"{label} ({len(rs)} seeds), task x head:", ""]
        for i, t in enumerate(tasks):
            row = [statistics.mean(m["learned"]["routing"][i][j] for m in rs)
                   for j in range(len(rs[0]["learned"]["routing"][i]))]
            lines.append(f"    {t:<14}" + "".join(f"{x:8.3f}" for x in row))
        lines.append("")
    return "\n".join(lines)


def summary_table(results):
    """Every run's accuracies, mean ± std over its seeds: each suite's low-resource task (the
    heldout suite: the unseen domain) and the mean over the suite's tasks."""
    lines = ["| run | seeds | low-resource task (heldout: movies, unseen), % | mean over the "
             "trained tasks, % | trainable |", "|---|---|---|---|---|"]
    for label, rs in results.items():
        suite, chosen = rs[0]["suite"], list(rs[0]["accuracy"]["val"])
        low = "movies" if suite == H else LOW[suite]
        lo = claims.fmt([m["accuracy"]["test"][low] * 100 for m in rs]) \
            if low in rs[0]["accuracy"]["test"] else "-"
        mean = claims.fmt([sum(m["accuracy"]["test"][t] for t in chosen) / len(chosen) * 100
                           for m in rs])
        lines.append(f"| {label} | {len(rs)} | {lo} | {mean} | {rs[0]['trainable']:,} |")
    return "\n".join(lines)


COST = {"none": 0.35, "full": 1.3, "lora": 1.0, "multihead": 1.4, "mtl": 1.3, "align": 1.1,
        "spurious": 1.1}      # a run's time in one-thread LoRA runs (about 100 s each)
RUN_S = 100


def plan(runs, common):
    """The runs not yet finished, (what, argv), and their time in LoRA runs; the first 3 seeds
    of every setting first, so a table stopped early has 3 seeds everywhere."""
    todo, cost = [], 0.0
    for label, (flags, n) in runs.items():
        for seed in range(n):
            argv = common + flags + ["--seed", str(seed)]
            args = realtext.get_args(argv)
            if not os.path.exists(os.path.join(args.out, args.name, "metrics.json")):
                todo.append((f"{label}, seed {seed}", argv + ["--quiet"]))
                share = len(args.tasks) / len(realtext.SUITES[args.suite]) if args.tasks else 1
                mmd = args.method == "align" and args.align_loss == "mmd"
                cost += 2.4 if mmd else COST[args.method] * (0.25 + 0.75 * share)
    todo.sort(key=lambda item: int(item[0].rpartition(" ")[2]) >= 3)   # 3 seeds of all first
    return todo, cost


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=compare.positive, default=1, help="runs at a time, one thread "
                   "each")
    p.add_argument("--out", default=os.path.join("out", "realtext"), help="realtext.py's --out")
    p.add_argument("--plan", action="store_true", help="print the plan and stop")
    p.add_argument("--seeds", type=compare.positive, help="at most this many seeds per setting "
                   "(default: each setting's own, 3 or 5)")
    args = p.parse_args(argv)
    runs = {k: (flags, min(n, args.seeds or n)) for k, (flags, n) in RUNS.items()}
    t0, common = time.perf_counter(), ["--out", args.out, "--cache", args.out]
    todo, cost = plan(runs, common)
    total = sum(n for _, n in runs.values())
    print(f"{total} runs, {len(todo)} to train: about {cost * RUN_S / args.jobs / 3600:.1f} h "
          f"at --jobs {args.jobs} on a 2-core CPU ({cost:.0f} one-thread LoRA runs of about "
          f"{RUN_S} s)", flush=True)
    if args.plan:
        return
    if todo:
        realtext.data.load(realtext.tokenizer(), 48, args.out)       # tokenized once, first
        claims.prerun(todo, args.jobs, SCRIPT)
    results = {label: [realtext.run(realtext.get_args(common + flags + ["--seed", str(s),
                                                                          "--quiet"]))
                       for s in range(n)] for label, (flags, n) in runs.items()}
    table = (f"real text:\n\n{claims.claims_table(results, CLAIMS)}\n\nThe digit benchmark's "
             f"lessons on real text:\n\n{lessons_table(results)}\n\nAlign-LoRA's weight:\n\n"
             f"{claims.sweep_table(results, SWEEPS, low_of, avg)}\n\nHydraLoRA's routing:\n\n"
             f"{routing_table(results)}\n\n"
             f"Every run:\n\n{summary_table(results)}")
    with open(os.path.join(args.out, "realtext-claims.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "realtext-claims.json"), "w") as f:
        json.dump(dict(results=results, runs=runs, low=LOW_BARS), f, indent=1)
    print(f"\n{table}\n{(time.perf_counter() - t0) / 60:.1f} min; wrote {args.out}/"
          "realtext-claims.md and .json")


if __name__ == "__main__":
    main()
