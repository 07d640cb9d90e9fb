"""Every method on N seeds, one table: the comparison behind the README's results.

    python benchmarks/compare.py --seeds 3                                  # the default suite
    python benchmarks/compare.py --seeds 3 --suite interference --rank 2    # + LoRA of each size

Each run is train.py's run() with the method's flags; a finished run (same settings) is reused,
so an interrupted comparison continues where it stopped and reruns cost nothing. Any other
train.py flag goes to every run (e.g. --steps 500); every run's flags are checked before the first
run trains, and flags that would change what is compared (--method, --tasks) are refused. On the
interference suite every adapter method is also paired with a LoRA of about its trainable-
parameter count (the rank rounded), and MT-CRL is left out (no task there has environments).
Writes <out>/<suite>-compare.md (the table) and .json.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

METHODS = {"none": ["--method", "none"], "full": ["--method", "full"],
           "lora": ["--method", "lora"], "multihead": ["--method", "multihead"],
           "multihead --no-router": ["--method", "multihead", "--no-router"],
           "mtl": ["--method", "mtl"], "align": ["--method", "align"],
           "spurious": ["--method", "spurious"]}
REFUSED = {   # train.py flags that compare.py sets itself, or that change what it compares
    "method": "compare.py runs every method of its table (train.py runs one)",
    "tasks": "compare.py compares on all of the suite's tasks",
    "resume": "compare.py continues an interrupted run by itself"}


class Runner:
    """Runs (label, flags) on every seed, with progress and the time left; keeps the results."""

    def __init__(self, common, adapter, seeds, planned):
        self.common, self.adapter, self.seeds, self.planned = common, adapter, seeds, planned
        self.results, self.t0, self.trained = {}, time.perf_counter(), []

    def argv(self, flags, seed):
        """train.py's command line of one run."""
        adapter = self.adapter if flags[1] not in ("none", "full") else []
        return self.common + adapter + flags + ["--seed", str(seed)]

    def __call__(self, label, flags, seeds=None):
        if label in self.results:
            return self.results[label]
        for seed in seeds or self.seeds:
            done = sum(len(r) for r in self.results.values())
            left = ""
            if self.trained:
                per_run = sum(self.trained) / len(self.trained)
                left = f", about {per_run * (self.planned - done) / 60:.0f} min left"
            print(f"\n=== [{done + 1}/{self.planned}] {label}, seed {seed}; "
                  f"{(time.perf_counter() - self.t0) / 60:.1f} min so far{left}", flush=True)
            t, args = time.perf_counter(), train.get_args(self.argv(flags, seed))
            run_dir = os.path.join(args.out, args.name)
            fresh = not os.path.exists(os.path.join(run_dir, "metrics.json"))
            args.resume = fresh and os.path.exists(os.path.join(run_dir, "ckpt.pt"))   # interrupted
            self.results.setdefault(label, []).append(train.run(args))   # finished: reused
            if fresh and flags[1] != "none":                    # for the time left
                self.trained.append(time.perf_counter() - t)
        return self.results[label]


def positive(text):
    """An argparse type: an integer >= 1 (a number of seeds)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return int(text)


def lora_of_size(runner, label, flags=()):
    """The label of a LoRA with about `label`'s trainable-parameter count (run if needed)."""
    base = runner("lora", METHODS["lora"])[0]
    per_rank = base["trainable"] / base["settings"]["rank"]
    r = max(1, round(runner.results[label][0]["trainable"] / per_rank))
    if r == base["settings"]["rank"]:
        return "lora"
    runner.planned += 0 if f"lora r{r}" in runner.results else len(runner.seeds)
    runner(f"lora r{r}", ["--method", "lora", *flags, "--rank", str(r)])
    return f"lora r{r}"


def ms(xs):
    """mean ± std over seeds, in %."""
    xs = torch.tensor([float(x) for x in xs], dtype=torch.float64) * 100
    return f"{xs.mean():.1f} ± {xs.std():.1f}" if len(xs) > 1 else f"{xs.mean():.1f}"


def average(run, tasks, split="test"):
    return sum(run["accuracy"][split][t] for t in tasks) / len(tasks)


def table(results, tasks, pairs=None):
    """Markdown: trainable parameters, each task's test accuracy and their average (mean ± std
    over seeds), has7's shifted accuracy, the paired LoRA's average, steps per second."""
    pairs = pairs or {}
    cols = ["method", "trainable", *tasks, "average"]
    cols += ["has7 shifted"] if "has7" in tasks else []
    cols += (["paired LoRA: average"] if pairs else []) + ["steps/s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for label, rs in results.items():
        row = [label, f"{rs[0]['trainable']:,} ({rs[0]['trainable'] / rs[0]['base_params']:.1%})"]
        row += [ms(r["accuracy"]["test"][t] for r in rs) for t in tasks]
        row += [ms(average(r, tasks) for r in rs)]
        row += [ms(r["accuracy"]["shift"]["has7"] for r in rs)] if "has7" in tasks else []
        p = pairs.get(label)
        row += ([f"{p}: {ms(average(r, tasks) for r in results[p])}" if p else ""] if pairs else [])
        row += [f"{sum(r['steps_per_s'] for r in rs) / len(rs):.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def methods_of(suite):
    """METHODS, less MT-CRL where no task has environments (train.py refuses it there)."""
    return {k: v for k, v in METHODS.items() if k != "spurious" or "has7" in train.SUITES[suite]}


def refused(extra):
    """The flags of REFUSED among the train.py flags in `extra` (abbreviations too)."""
    p = train.parser()
    p.set_defaults(**dict.fromkeys(REFUSED))              # None: not given
    given = vars(p.parse_known_args(list(extra))[0])
    return [k for k in REFUSED if given[k] is not None]


def compare(args, extra=()):
    """Every method of METHODS on args.seeds seeds; returns (results, pairs). Every run's
    flags are checked (train.get_args) before the first run trains."""
    common = ["--suite", args.suite, "--out", args.out, "--base", args.base, *extra]
    seeds = range(args.seed, args.seed + args.seeds)
    methods = methods_of(args.suite)
    runner = Runner(common, ["--rank", str(args.rank)], seeds, len(methods) * args.seeds)
    for flags in methods.values():
        for seed in seeds:
            train.get_args(runner.argv(flags, seed))
    for label, flags in methods.items():
        runner(label, flags)
    pairs = {label: lora_of_size(runner, label) for label in list(methods)[3:]} \
        if args.suite == "interference" else {}
    return runner.results, pairs


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="default", choices=["default", "interference"])
    p.add_argument("--seeds", type=positive, default=3,
                   help="seeds per method: --seed, --seed + 1, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=positive, default=8, help="every adapter's rank")
    p.add_argument("--out", default="out", help="train.py's --out")
    p.add_argument("--base", help="train.py's --base (default: <out>/base.pt)")
    args, extra = p.parse_known_args()         # any other flag goes to every run, e.g. --steps 500
    for k in refused(extra):
        p.error(f"--{k.replace('_', '-')}: {REFUSED[k]}; drop it")
    args.base = args.base or os.path.join(args.out, "base.pt")
    if "spurious" not in methods_of(args.suite):
        print(f"spurious is left out: no task of the {args.suite} suite has environments")
    t0 = time.perf_counter()
    results, pairs = compare(args, extra)
    text = table(results, train.SUITES[args.suite], pairs)
    path = os.path.join(args.out, f"{args.suite}-compare")
    with open(path + ".md", "w") as f:
        f.write(text + "\n")
    with open(path + ".json", "w") as f:
        json.dump(dict(results=results, pairs=pairs), f, indent=1)
    print(f"\n{text}\n\n{args.seeds} seed(s); {(time.perf_counter() - t0) / 60:.1f} min; "
          f"wrote {path}.md, .json")


if __name__ == "__main__":
    main()
