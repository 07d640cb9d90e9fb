"""Median training-step time of each method on train.py's model, in one process.

    python benchmarks/step_time.py                      # every method, default model (width 64)
    python benchmarks/step_time.py --methods full,lora,peft --widths 64,128,256,512   # + HF peft

A step is forward + backward + AdamW on one fixed mixed-task batch, built and run exactly as
train.py does (its build_model, logits_for and regularizer, each method's default flags, all at
the same --rank; spurious is timed after its invariance warm-up). hydra = multihead, mlora =
multihead --no-router, align-mmd = align --align-loss mmd. Methods are timed in interleaved
rounds (every round times each method once for --steps steps) so drift in the machine's speed
hits all of them alike; the figure is the median over rounds, and the ratio is to lora's.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

TARGETS = ["q", "k", "v", "o", "up", "down"]
FLAGS = {"hydra": ["--method", "multihead"], "mlora": ["--method", "multihead", "--no-router"],
         "align-mmd": ["--method", "align", "--align-loss", "mmd"]}


def build(method, base, width, args):
    """(model, train-style args, extra loss) for one method, on a copy of the base weights."""
    if method == "peft":
        import peft
        model = train.GPT(base.config)
        model.load_state_dict(base.state_dict())
        cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                              lora_dropout=0.0)
        return peft.get_peft_model(model, cfg), None, None
    targs = train.get_args(FLAGS.get(method, ["--method", method]) + [
        "--rank", str(args.rank), "--width", str(width), "--layers", str(args.layers),
        "--batch", str(args.batch), "--device", "cpu"])
    model = train.build_model(targs, base.state_dict(), len(train.SUITES["default"]))
    return model, targs, train.regularizer(model, targs, targs.steps)


def stepper(model, targs, extra, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    step_no = targs.steps - 1 if targs else 0                  # after any warm-up

    def step():
        if targs is None:                                      # peft: a plain forward
            logits, h = model(batch["idx"]), None
        else:
            logits, h = train.logits_for(model, batch["idx"], batch["task"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
        if extra is not None:
            loss = loss + extra(step_no, batch, logits, h)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def time_methods(methods, width, args):
    cfg = train.GPTConfig(block=2 * 8 + 1, width=width, layers=args.layers, heads=4)
    torch.manual_seed(0)
    base = train.GPT(cfg)
    batch = train.make_batch(train.SUITES["default"], args.batch, seed=0)
    steps = {m: stepper(*build(m, base, width, args), batch) for m in methods}
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
    p.add_argument("--methods", default="full,lora,hydra,mlora,mtl,align,align-mmd,spurious",
                   help="comma-separated; peft = HF peft's LoRA (pip install peft)")
    args = p.parse_args()
    methods = args.methods.split(",")
    if "lora" not in methods:
        p.error("--methods must include lora (the ratios are to lora)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"rank {args.rank}, {args.layers} layers; median ms/step over {args.rounds} rounds")
    for w in [int(x) for x in args.widths.split(",")]:
        t = time_methods(methods, w, args)
        print(f"width {w}:" + "".join(f"  {m} {1e3 * t[m]:.2f} ms ({t[m] / t['lora']:.2f}x)"
                                      for m in methods), flush=True)


if __name__ == "__main__":
    main()
