"""Median training-step time of each method on train.py's model, in one process.

    python benchmarks/step_time.py                      # default model (width 64)
    python benchmarks/step_time.py --widths 64,128,256,512 --peft   # + HF peft's LoRA (pip install peft)

A step is forward + backward + AdamW on one fixed mixed-task batch. Methods are timed in
interleaved rounds (every round times each method once for --steps steps) so drift in the
machine's speed hits all of them alike; the figure is the median over rounds.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora  # noqa: E402
import train  # noqa: E402

TARGETS = ["q", "k", "v", "o", "up", "down"]


def build(method, base, r):
    model = copy.deepcopy(base)
    if method == "full":
        return model
    if method == "lora":
        lora.add_lora(model, TARGETS, r=r, alpha=2 * r)
        return model
    if method == "peft":
        import peft
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0)
        return peft.get_peft_model(model, cfg)
    raise ValueError(method)


def stepper(model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = F.cross_entropy(model(batch["idx"]).flatten(0, 1), batch["targets"].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def time_methods(methods, width, args):
    cfg = train.GPTConfig(block=2 * 8 + 1, width=width, layers=args.layers, heads=4)
    torch.manual_seed(0)
    base = train.GPT(cfg)
    batch = train.make_batch(train.SUITES["default"], args.batch, seed=0)
    steps = {m: stepper(build(m, base, args.rank), batch) for m in methods}
    times = {m: [] for m in methods}
    for s in steps.values():                       # warm-up
        for _ in range(3):
            s()
    for _ in range(args.rounds):
        for m, s in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                s()
            times[m].append((time.perf_counter() - t0) / args.steps)
    return {m: statistics.median(t) for m, t in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--widths", default="64", help="comma-separated model widths")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=10, help="steps per round and method")
    p.add_argument("--peft", action="store_true", help="also time HF peft's LoRA")
    args = p.parse_args()
    methods = ["full", "lora"] + (["peft"] if args.peft else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"rank {args.rank}, {args.layers} layers; median ms/step over {args.rounds} rounds")
    head = f"{'width':>6}" + "".join(f"{m:>9}" for m in methods) + f"{'lora/full':>11}"
    print(head + (f"{'lora/peft':>11}" if args.peft else ""))
    for w in [int(x) for x in args.widths.split(",")]:
        t = time_methods(methods, w, args)
        row = f"{w:>6}" + "".join(f"{1e3 * t[m]:>9.2f}" for m in methods)
        row += f"{t['lora'] / t['full']:>11.2f}"
        print(row + (f"{t['lora'] / t['peft']:>11.2f}" if args.peft else ""), flush=True)


if __name__ == "__main__":
    main()
