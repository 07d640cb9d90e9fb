"""Choose MT-CRL's invariance weight on validation draws, never on the shifted test split.

    python benchmarks/tune_spurious.py --grid 1,3,10,30 --seeds 0,1,2

Each weight trains `python train.py --method spurious --invariance-weight w` on each seed
(finished runs are reused) and is scored on the in-distribution *validation* draw (its own
seeds, the training environments rho 0.8 / 0.95, clean labels). Clean-label accuracy in
distribution already tells the shortcut (about 68% on has7) from has7's own feature (about 100%),
so no shifted data is needed to choose. The best mean over the tasks and seeds wins.
"""
import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

OURS = ["method", "invariance_weight", "seed", "out", "base"]     # set here, not by --flags


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="1,3,10,30", help="values of --invariance-weight")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; the score is their mean")
    p.add_argument("--flags", default="", help="other train.py flags, e.g. \"--modules 1\"")
    p.add_argument("--out", default="out", help="train.py's --out")
    p.add_argument("--base", help="train.py's --base (default: <out>/base.pt)")
    args = p.parse_args()
    try:
        flags = shlex.split(args.flags)                   # quoted words kept whole
    except ValueError as e:
        p.error(f"--flags: {e} in {args.flags!r}")
    given = train.parser()
    given.set_defaults(**dict.fromkeys(OURS))             # None: not given in --flags
    mine = [k for k, v in vars(given.parse_known_args(flags)[0]).items()
            if k in OURS and v is not None]
    if mine:
        p.error(f"--flags: {', '.join('--' + k.replace('_', '-') for k in mine)} is set by "
                "tune_spurious.py itself (--grid, --seeds, --out, --base): drop it from --flags")
    base = ["--base", args.base] if args.base else []
    grid, seeds = args.grid.split(","), args.seeds.split(",")
    runs = {(w, seed): train.get_args(["--method", "spurious", "--invariance-weight", w.strip(),
                                       "--seed", seed.strip(), "--out", args.out, *base, *flags])
            for w in grid for seed in seeds}            # every flag checked before the first run
    tasks, rows = train.SUITES["default"], []
    for w in grid:
        vals = [train.run(runs[w, seed])["accuracy"]["val"] for seed in seeds]
        rows.append((w, {t: sum(v[t] for v in vals) / len(vals) for t in tasks},
                     [v["has7"] for v in vals]))
    print(f"\nvalidation accuracy (in distribution, clean labels; mean over seeds {args.seeds}); "
          f"flags: {args.flags or '-'}")
    print("| weight | " + " | ".join(tasks) + " | has7 per seed | mean |\n|---|"
          + "---|" * (len(tasks) + 2))
    for w, val, per_seed in rows:
        print(f"| {w} | " + " | ".join(f"{100 * val[t]:.1f}" for t in tasks) + " | "
              + " / ".join(f"{100 * v:.1f}" for v in per_seed)
              + f" | {100 * sum(val.values()) / len(tasks):.1f} |")
    print(f"best --invariance-weight: {max(rows, key=lambda r: sum(r[1].values()))[0]}")


if __name__ == "__main__":
    main()
