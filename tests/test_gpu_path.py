"""What a GPU run does, checked on the CPU: bf16 autocast through every method, no host read of
a tensor value in a training step, and torch.compile of a step."""
import os

import pytest
import torch

import multihead_lora
import mtl_lora
import train
from helpers import count_host_reads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["full", "lora", "multihead", "multihead --no-router", "multihead --no-router --init offset",
           "mtl", "align", "align --align-loss mmd", "spurious"]


def tiny(method, extra=""):
    """A small model adapted for `method` as train.py does, its args and its extra loss."""
    args = train.get_args(f"--method {method} --width 16 --layers 1 --attn-heads 2 --batch 32 "
                          f"--steps 60 --warmup 2 --device cpu {extra}".split())
    torch.manual_seed(0)
    m = train.adapt(train.GPT(train.GPTConfig(width=16, layers=1, heads=2)), args, 4)
    return args, m.model, m.extra_loss


def train_steps(args, model, extra, steps):
    batches = lambda step: train.make_batch(train.SUITES["default"], args.batch, seed=step)
    return train.train(model, batches, steps, args.lr, args.warmup, extra, args.autocast == "bf16")


@pytest.mark.parametrize("method", METHODS)
def test_no_host_read_in_a_training_step(method, monkeypatch):
    """Reads per step, from two runs of different length: at most the loss read every 25 steps."""
    reads = {}
    for steps in (10, 60):
        args, model, extra = tiny(method, "--invariance-warmup 0" if method == "spurious" else "")
        counted = count_host_reads(monkeypatch)
        train_steps(args, model, extra, steps)
        reads[steps] = len(counted)
        monkeypatch.undo()
    assert (reads[60] - reads[10]) / 50 <= 1 / 25, reads


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_on_cpu_runs_what_a_gpu_runs(method):
    args, model, extra = tiny(method, "--autocast bf16")
    assert args.autocast == "bf16"
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses, _ = train_steps(args, model, extra, 3)
    assert losses and all(torch.isfinite(torch.tensor(v)) for _, v in losses)
    for n, p in model.named_parameters():
        if n in trainable:                               # fp32 weights, updated under bf16 compute
            assert p.dtype == torch.float32 and not torch.equal(p, trainable[n]), n
    b = train.make_batch(train.SUITES["default"], 8, seed=0)
    with torch.autocast("cpu", torch.bfloat16):
        logits, h = model(b["idx"], b["task"])
        assert logits.dtype == torch.bfloat16
        if method == "multihead":
            with multihead_lora.record_routing(model.gpt) as rec:
                model(b["idx"], b["task"])
            assert all(w.dtype == torch.float32 for w in rec.values())      # fp32 router softmax
        if method == "mtl":
            assert all(p.dtype == torch.float32 for p in mtl_lora.mixing_weights(model.gpt).values())
        if extra is not None:                            # align's statistics, MT-CRL's penalties
            assert extra(59, b, logits, h).dtype == torch.float32


def test_compile_traces_a_training_step_without_graph_breaks():
    """--compile: every method's forward traces as one graph (dynamo only: no code generation)."""
    import torch._dynamo
    for method in ["lora", "multihead", "mtl", "spurious", "align"]:
        args, model, extra = tiny(method)
        b = train.make_batch(train.SUITES["default"], 8, seed=0)
        torch._dynamo.reset()
        want = model(b["idx"], b["task"])[0]
        model.gpt.features = torch.compile(model.gpt.features, backend="eager", fullgraph=True)
        torch.testing.assert_close(model(b["idx"], b["task"])[0], want)   # as train.py compiles
        for _ in range(2 if extra else 0):       # align's hooks, compiled, fill its captures
            logits, h = model(b["idx"], b["task"])
            assert torch.isfinite(extra(59, b, logits, h))
