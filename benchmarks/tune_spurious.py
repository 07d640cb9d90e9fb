"""Choose MT-CRL's regularizer weights on a validation draw, never on the shifted test split.

    python benchmarks/tune_spurious.py                         # --invariance-weight 1,3,10,30
    python benchmarks/tune_spurious.py --grid 10,30 --seeds 0,1,2 --flags "--invariance var"

Each setting trains `python train.py --method spurious <flags> --invariance-weight w` (on each
of --seeds, the cached base of --out) and is scored on the in-distribution *validation* draw
(split "val": its own seeds, the training environments rho 0.8 / 0.95, clean labels).
Clean-label accuracy in distribution already separates the shortcut (about 68% on has7) from
the real feature (about 100%), so no shifted data is needed to choose. The best mean over the
tasks wins.
"""
import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--grid", default="1,3,10,30", help="values of --invariance-weight")
    p.add_argument("--flags", default="", help="other train.py flags, e.g. \"--invariance var\"")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; the score is their mean")
    p.add_argument("--out", default="out", help="train.py's --out (its cached base is reused)")
    args = p.parse_args()
    tasks, rows = train.SUITES["default"], []
    for w in args.grid.split(","):
        out = os.path.join(args.out, f"tune-spurious-w{w}")
        os.makedirs(out, exist_ok=True)
        if os.path.exists(os.path.join(args.out, "base.pt")):
            shutil.copy(os.path.join(args.out, "base.pt"), os.path.join(out, "base.pt"))
        vals = [train.run(train.get_args(f"--method spurious --invariance-weight {w} --out {out} "
                                         f"--seed {seed} {args.flags}".split()))["accuracy"]["val"]
                for seed in args.seeds.split(",")]
        val = {t: sum(v[t] for v in vals) / len(vals) for t in tasks}
        rows.append((sum(val.values()) / len(tasks), w, val))
    print(f"\nvalidation accuracy (in distribution, clean labels; mean over seeds {args.seeds}), "
          f"flags: {args.flags or '-'}")
    print(f"{'weight':>8}" + "".join(f"{t:>11}" for t in tasks) + f"{'mean':>9}")
    for mean, w, val in rows:
        print(f"{w:>8}" + "".join(f"{val[t]:>11.1%}" for t in tasks) + f"{mean:>9.1%}")
    print(f"best --invariance-weight: {max(rows, key=lambda r: r[0])[1]}")


if __name__ == "__main__":
    main()
