"""Training-step time of each method on MiniLM, against HF peft's LoRA on the same model and batch.

    python benchmarks/realtext_speed.py                     # 16 texts, 48 tokens, r=8, 5 rounds

A step is realtext.py's: forward of the adapted encoder, mean pooling, the heads, cross-entropy
(+ the method's term: L_align, MT-CRL's penalties past their warm-up), backward, AdamW, on one
fixed batch of the unrelated suite (4 texts of each task, padded to the longest). peft: the same
encoder and heads with peft.get_peft_model(LoraConfig(r, alpha 2r, the same 36 targets)). Timed
in interleaved rounds (step_time.interleaved): a change in the machine's speed hits every method
alike; the figure is the median over rounds, and the ratio is to peft's LoRA.
"""
import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import realtext  # noqa: E402
import step_time  # noqa: E402

CASES = {"none": ["--method", "none"], "full": ["--method", "full"], "lora": ["--method", "lora"],
         "hydra": ["--method", "multihead"], "mlora": ["--method", "multihead", "--no-router"],
         "mtl": ["--method", "mtl"], "align": ["--method", "align"],
         "align-mmd": ["--method", "align", "--align-loss", "mmd"],
         "spurious": ["--method", "spurious", "--suite", "heldout"], "peft": ["--method", "lora"]}


def stepper(case, enc, d, args):
    rargs = realtext.get_args(CASES[case] + ["--quiet"] + (
        ["--rank", str(args.rank)] if case not in ("none", "full") else []))
    tasks = realtext.SUITES[rargs.suite]
    enc = copy.deepcopy(enc)
    torch.manual_seed(0)
    if case == "peft":                                # peft's LoRA layers, the same heads
        import peft
        config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                 target_modules=realtext.TARGETS)
        enc = peft.get_peft_model(enc, config).base_model.model
        classes = [len(realtext.data.CLASSES[t]) for t in tasks]
        model, extra = realtext.Classifier(enc, classes), None
    else:
        model, extra, _ = realtext.adapt(enc, rargs, tasks)
    s = realtext.stacked(d, tasks, [args.per_task] * len(tasks), 0)
    b = realtext.batch_of(*s, torch.arange(len(s[2])), int(s[1].max()))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        logits, pooled = model(b["ids"], b["mask"], b["task"])
        loss = F.cross_entropy(logits, b["label"])
        if extra is not None:
            loss = loss + extra(b, logits, pooled, rargs.steps - 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(CASES))
    p.add_argument("--rank", type=realtext.number(int, 1, 384), default=8)
    p.add_argument("--per-task", type=realtext.number(int, 1, 256), default=4)
    p.add_argument("--rounds", type=realtext.number(int, 1, 1000), default=5)
    p.add_argument("--steps", type=realtext.number(int, 1, 1000), default=3, help="per round")
    p.add_argument("--out", default=os.path.join("out", "realtext"), help="the data's cache")
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.methods.split(",")]
    if set(cases) - set(CASES) or "peft" not in cases:
        p.error(f"--methods takes some of {','.join(CASES)}, peft among them; got {args.methods}")
    args.device = "cpu"
    d = realtext.data.load(realtext.tokenizer(), 48, args.out)
    enc = realtext.encoder("cpu")
    steps = {c: stepper(c, enc, d, args) for c in cases}
    for step in steps.values():
        step_time.warm(step, "cpu")
    t = step_time.interleaved(steps, args)
    print(f"MiniLM, {args.per_task * 4} texts of at most 48 tokens, r={args.rank}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} rounds:")
    for c in cases:
        print(f"  {c:<10} {t[c] * 1000:7.0f} ms   ours / peft {t[c] / t['peft']:.2f}")


if __name__ == "__main__":
    main()
