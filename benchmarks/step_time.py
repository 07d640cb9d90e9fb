"""Median training-step time of each method on train.py's model, in one process.

    python benchmarks/step_time.py               # every method, the default model (width 64)
    python benchmarks/step_time.py --compile     # also torch.compile'd, against eager
    python benchmarks/step_time.py --methods full,lora,peft --widths 64,128,256   # + HF peft

A step is forward + backward + AdamW on one fixed mixed-task batch of the default suite
(train.make_batch), on a copy of one random base (no pre-training: the time does not depend on
the weights), adapted by train.adapt as train.py adapts it: each method's adapters and its extra
loss (Align-LoRA's L_align, MT-CRL's three penalties), with each method's default flags, all at the
same --rank; spurious is timed past its invariance warm-up. hydra = multihead, mlora = multihead
--no-router, align-mmd = align --align-loss mmd. The methods are timed in interleaved rounds
(each round times every method once for --steps steps), so a change in the machine's speed hits
them all alike; the figure is the median over rounds, the ratio is to lora's. With --compile,
each method's compiled step is then timed against its eager step, interleaved; its first three
steps (the compile) are timed apart. Never calls torch.set_num_threads: on CPU even setting the
default slows the fused attention kernel 2-3x.
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

FLAGS = {"hydra": ["--method", "multihead"], "mlora": ["--method", "multihead", "--no-router"],
         "align-mmd": ["--method", "align", "--align-loss", "mmd"]}


def stepper(method, base, args, compiled):
    """One training step of `method` as a function, on a fresh copy of the base weights."""
    flags = FLAGS.get(method, ["--method", "lora" if method == "peft" else method])
    targs = train.get_args(flags + [
        "--width", str(base.config.width), "--layers", str(args.layers), "--batch", str(args.batch),
        "--device", args.device] + (["--rank", str(args.rank)] if method != "full" else []))
    tasks = train.SUITES["default"]
    batch = train.make_batch(tasks, args.batch, seed=0, device=args.device)
    if method == "peft":
        import peft
        gpt = train.GPT(base.config)
        gpt.load_state_dict(base.state_dict())
        peft.get_peft_model(gpt, peft.LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
            target_modules=["q", "k", "v", "o", "up", "down"]))
        model, extra = train.TaskModel(gpt), None
    else:
        gpt = train.GPT(base.config)
        gpt.load_state_dict(base.state_dict())
        torch.manual_seed(0)
        m = train.adapt(gpt, targs, len(tasks))                # as train.py adapts it
        model, extra = m.model, m.extra_loss
    model = model.to(args.device)
    if compiled:                                    # as train.py --compile does
        model.gpt.features = torch.compile(model.gpt.features)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    autocast = torch.autocast(args.device, torch.bfloat16, enabled=targs.autocast == "bf16")

    def step():
        with autocast:
            logits, h = model(batch["idx"], batch["task"])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten())
        if extra is not None:
            loss = loss + extra(targs.steps - 1, batch, logits, h)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(steps, args):
    """Median seconds per step of each stepper, timed in interleaved rounds."""
    times = {r: [] for r in steps}
    for _ in range(args.rounds):
        for r, step in steps.items():
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(args.device)
            times[r].append((time.perf_counter() - t0) / args.steps)
    return {r: statistics.median(t) for r, t in times.items()}


def warm(step, device):
    t0 = time.perf_counter()
    for _ in range(3):                             # warm-up (compiled: the compile)
        step()
    sync(device)
    return time.perf_counter() - t0


def time_methods(methods, width, args):
    """Eager steps of every method interleaved; with --compile, then each method's compiled step
    interleaved with its eager one, one method at a time (a fresh dynamo cache each: its guards
    can miss align's hooks and reuse another model's graph)."""
    torch.manual_seed(0)
    base = train.GPT(train.GPTConfig(width=width, layers=args.layers))
    eager = {m: stepper(m, base, args, False) for m in methods}
    for step in eager.values():
        warm(step, args.device)
    t = {(m, False): v for m, v in interleaved(eager, args).items()}
    cold = {}
    for m in methods if args.compile else []:
        torch._dynamo.reset()
        compiled = stepper(m, base, args, True)
        cold[m] = warm(compiled, args.device)
        pair = interleaved({False: eager[m], True: compiled}, args)
        t[m, True] = pair[True] / pair[False] * t[m, False]       # the ratio measured side by side
    return t, cold


def positive(text):
    """An argparse type: an integer >= 1."""
    if not (text.isascii() and text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def widths(text):
    """An argparse type: comma-separated integers >= 1, e.g. 64,128."""
    try:
        return [positive(w.strip()) for w in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"takes comma-separated integers >= 1, e.g. 64,128; "
                                         f"got {text!r}") from None


METHODS = [m for m in train.METHODS if m != "none"] + list(FLAGS) + ["peft"]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--widths", type=widths, default="64", help="comma-separated model widths")
    p.add_argument("--layers", type=positive, default=3)
    p.add_argument("--batch", type=positive, default=256)
    p.add_argument("--rank", type=positive, default=8)
    p.add_argument("--rounds", type=positive, default=7, help="the figure is their median")
    p.add_argument("--steps", type=positive, default=10, help="steps per round and method")
    p.add_argument("--methods", default="full,lora,hydra,mlora,mtl,align,align-mmd,spurious",
                   help="comma-separated, of " + ",".join(METHODS) + "\n"
                   "(peft = HF peft's LoRA: pip install peft)")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="also time each method torch.compile'd")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {','.join(unknown)}; take some of {','.join(METHODS)}")
    if "lora" not in args.methods:
        p.error("--methods must include lora (the ratios are to lora)")
    if "peft" in args.methods and importlib.util.find_spec("peft") is None:
        p.error("--methods peft needs HF peft: pip install peft (or leave peft out)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no GPU here (torch.cuda.is_available() is False); "
                "use --device cpu")
    return args


def main():
    args = get_args()
    methods = args.methods
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"torch {torch.__version__}, {name}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}, rank {args.rank}, {args.layers} layers; median ms/step over "
          f"{args.rounds} rounds")
    for w in args.widths:
        t, cold = time_methods(methods, w, args)
        print(f"width {w}, eager:" + "".join(f"  {m} {1e3 * t[m, False]:.2f} ms "
                                             f"({t[m, False] / t['lora', False]:.2f}x)"
                                             for m in methods))
        if args.compile:
            print(f"width {w}, compiled:" + "".join(f"  {m} {1e3 * t[m, True]:.2f} ms "
                                                    f"({t[m, True] / t[m, False]:.2f}x eager)"
                                                    for m in methods))
            print(f"width {w}, first 3 steps compiled, compile included (s):"
                  + "".join(f"  {m} {cold[m]:.0f}" for m in methods))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
