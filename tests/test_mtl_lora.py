"""What MTL-LoRA computes: for a sample of task t, h_t = W0 x + s * (sum_i p_{t,i} B_i) Lam_t A
drop(x), p_t = softmax(w_t / tau); merged per task, W_t; the parameter counts (guards:
tests/test_mtl_lora_guards.py)."""
import math

import pytest
import torch
import torch.nn as nn

import mtl_lora
from helpers import Tiny

T = 3


def adapted(seed=0, n_tasks=T, **kw):
    torch.manual_seed(seed)
    model = Tiny()
    mtl_lora.add_mtl_lora(model, n_tasks, targets=["q", "up", "down"], **dict(r=4, n_up=3) | kw)
    return model


def randomize(model, seed=1):
    """Random nonzero B, Lam and w, so every term of the update matters."""
    g = torch.Generator().manual_seed(seed)
    for m in mtl_lora.mtl_layers(model):
        for p, std in ((m.lora_B, 0.1), (m.lora_lambda, 1.0), (m.lora_w, 1.0)):
            p.data = std * torch.randn(p.shape, generator=g)


def reference_weight(m, t):
    """W_t = W0 + s * (sum_i p_{t,i} B_i) Lam_t A, written out from the paper's formula."""
    e = torch.exp(m.lora_w[t] / m.tau)
    p = e / e.sum()
    B = sum(p[i] * m.lora_B[i] for i in range(m.n_up))
    lam = torch.diag(m.lora_lambda[t]) if m.diagonal else m.lora_lambda[t]
    return m.base.weight + (m.alpha / m.r) * B @ lam @ m.lora_A.weight


def count(m):
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("shape", [(6, 10), (6, 4, 10), (6, 2, 3, 10)])
def test_vectorized_forward_equals_per_sample_loop(diagonal, shape):
    """h_t = W_t x + b, W_t from the paper's formula, sample by sample: a batch may mix tasks."""
    torch.manual_seed(0)
    layer = mtl_lora.MTLLoRALinear(nn.Linear(10, 7), n_tasks=4, r=3, n_up=2, alpha=6.0, tau=0.5,
                                   diagonal=diagonal)
    randomize(layer)
    x = torch.randn(shape)
    ids = torch.tensor([2, 0, 3, 2, 1, 0])
    with mtl_lora.task_ids(layer, ids):
        out = layer(x)
    with torch.no_grad():
        for b, t in enumerate(ids.tolist()):
            expected = x[b] @ reference_weight(layer, t).T + layer.base.bias
            torch.testing.assert_close(out[b], expected, atol=1e-5, rtol=1e-5)
    assert out.shape == shape[:-1] + (7,)


def test_merged_weight_equals_formula():
    """merge(t) writes W_t = W0 + s (sum_i p_{t,i} B_i) Lam_t A into the base weight."""
    torch.manual_seed(0)
    layer = mtl_lora.MTLLoRALinear(nn.Linear(8, 6), n_tasks=T, r=2, diagonal=True)
    randomize(layer)
    with torch.no_grad():
        expected = reference_weight(layer, 1)
    layer.merge(1)
    torch.testing.assert_close(layer.base.weight, expected, atol=1e-5, rtol=1e-5)


def test_mixing_weights():
    """p_t = softmax(w_t / tau), per task over the n up-projections."""
    model = adapted(tau=0.5)
    randomize(model)
    mix = mtl_lora.mixing_weights(model)
    assert list(mix) == [f"blocks.{i}.{t}" for i in range(2) for t in ["q", "up", "down"]]
    w = model.blocks[1]["up"].lora_w
    p = mix["blocks.1.up"]
    assert p.shape == (T, 3) and p.dtype == torch.float32 and not p.requires_grad
    torch.testing.assert_close(p, torch.exp(2 * w) / torch.exp(2 * w).sum(1, keepdim=True))


def test_noop_at_init_and_init_values():
    """B = 0, Lam_t = I, A and w ~ U(+-1/sqrt(fan_in)): step 0 computes exactly the base."""
    torch.manual_seed(0)
    base = Tiny()
    x = torch.randn(4, 7, 12)
    ref = base(x)
    names = mtl_lora.add_mtl_lora(base, T, targets=["q", "up", "down"], r=4)
    assert names == [f"blocks.{i}.{t}" for i in range(2) for t in ["q", "up", "down"]]
    with mtl_lora.task_ids(base, torch.tensor([0, 1, 2, 1])):
        assert torch.equal(base(x), ref)
    for m in mtl_lora.mtl_layers(base):
        assert torch.count_nonzero(m.lora_B) == 0 and m.base.bias is not None
        assert torch.equal(m.lora_lambda, torch.eye(4).repeat(T, 1, 1))
        bound = 1 / math.sqrt(m.base.in_features)
        assert m.lora_A.weight.abs().max() <= bound and m.lora_A.weight.std() > bound / 4
        assert m.lora_w.abs().max() <= 1 / math.sqrt(3) and m.lora_w.std() > 0
    layer = mtl_lora.MTLLoRALinear(nn.Linear(5, 5, bias=False), T, r=2, diagonal=True)
    assert layer.base.bias is None and torch.equal(layer.lora_lambda, torch.ones(T, 2))


def test_merged_per_task_equals_unmerged_and_unmerge_restores():
    """Merged for task t, the model gives task t's unmerged outputs; unmerge gives W0 back."""
    model = adapted()
    randomize(model)
    x = torch.randn(2, 5, 12)
    w0 = model.blocks[0]["q"].base.weight.clone()
    for t in range(T):
        ids = torch.full((2,), t)
        with mtl_lora.task_ids(model, ids):
            unmerged = model(x)
        mtl_lora.merge_mtl_lora(model, t)
        w_merged = model.blocks[0]["q"].base.weight.clone()
        mtl_lora.merge_mtl_lora(model, t)                   # twice: a no-op, not a double add
        assert torch.equal(model.blocks[0]["q"].base.weight, w_merged)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)   # no ids needed
        with mtl_lora.task_ids(model, ids):                 # ids of the merged task are fine
            torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
        mtl_lora.unmerge_mtl_lora(model)
        mtl_lora.unmerge_mtl_lora(model)
        torch.testing.assert_close(model.blocks[0]["q"].base.weight, w0, atol=1e-6, rtol=0)
        assert all(m.merged_task is None for m in mtl_lora.mtl_layers(model))


def test_dropout_only_in_training():
    """drop(x) is random in train mode and the identity in eval mode."""
    model = adapted(dropout=0.5)
    randomize(model)
    x, ids = torch.randn(2, 3, 12), torch.tensor([1, 2])
    with mtl_lora.task_ids(model, ids):
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("diagonal", [False, True])
def test_param_count_formula_and_only_adapters_train(diagonal):
    """r*d_in + T*r*r (diagonal: T*r) + n*r*d_out + T*n trainable per layer, each with a grad."""
    model = adapted(r=4, n_up=3, diagonal=diagonal)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    lam = T * 4 if diagonal else T * 4 * 4
    per = lambda d_in, d_out: 4 * d_in + lam + 3 * 4 * d_out + T * 3
    assert count(model) == 2 * (per(12, 12) + per(12, 36) + per(36, 12))
    randomize(model)
    with mtl_lora.task_ids(model, torch.tensor([0, 2])):
        model(torch.randn(2, 3, 12)).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if ".lora_" in n)


def test_param_count_llama2_7b_qkvo():
    """LLaMA-2-7B's q,k,v,o (32 layers of 4096 x 4096) as in the authors' commonsense script, r=8,
    n=3, 8 tasks: 131,608 trainable per layer (4096 r + T r^2 + 4096 n r + T n), 16,845,824 all."""
    with torch.device("meta"):
        blocks = nn.ModuleList(nn.ModuleDict({t: nn.Linear(4096, 4096, bias=False) for t in "qkvo"})
                               for _ in range(32))
        mtl_lora.add_mtl_lora(blocks, 8, targets=["q", "k", "v", "o"], r=8, n_up=3)
    assert count(blocks[0]["q"]) == 131_608
    assert count(blocks) == 16_845_824
