"""What LoRA computes: h = W0 x + s * B A drop(x), s = alpha / r, the base model at init, merged
W = W0 + s B A, r * (d_in + d_out) parameters per layer (guards: tests/test_lora_guards.py)."""
import math

import torch
import torch.nn as nn

import lora
from helpers import Tiny


def adapted(r=4, alpha=8.0, seed=0, **kw):
    torch.manual_seed(seed)
    model = Tiny()
    lora.add_lora(model, targets=["q", "up", "down"], r=r, alpha=alpha, **kw)
    return model


def randomize_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in lora.lora_layers(model):
        m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=g)


def test_forward_equals_formula():
    """h = W0 x + b + (alpha / r) * B A x, written out."""
    torch.manual_seed(0)
    lin = nn.Linear(10, 6)
    layer = lora.LoRALinear(lin, r=3, alpha=6.0)
    layer.lora_B.weight.data.normal_()
    x = torch.randn(4, 10)
    A, B, W0, b0 = layer.lora_A.weight, layer.lora_B.weight, lin.weight, lin.bias
    expected = x @ W0.T + b0 + (6.0 / 3) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected)


def test_noop_at_init_and_init_distribution():
    """B = 0 and A ~ U(+-1/sqrt(d_in)): the adapted model computes exactly what the base does."""
    torch.manual_seed(0)
    base = Tiny()
    x = torch.randn(3, 7, 12)
    ref = base(x)
    names = lora.add_lora(base, targets=["q", "up", "down"], r=4)
    assert names == [f"blocks.{i}.{t}" for i in range(2) for t in ["q", "up", "down"]]
    assert torch.equal(base(x), ref)
    for m in lora.lora_layers(base):
        assert torch.count_nonzero(m.lora_B.weight) == 0
        bound = 1 / math.sqrt(m.base.in_features)
        assert m.lora_A.weight.abs().max() <= bound and m.lora_A.weight.std() > bound / 4


def test_merge_unmerge_equivalence_and_idempotence():
    """Merged W = W0 + s B A gives the unmerged outputs; unmerge gives W0 back; both idempotent."""
    model = adapted()
    randomize_B(model)
    x = torch.randn(2, 5, 12)
    w0 = model.blocks[0]["q"].base.weight.clone()
    unmerged = model(x)
    lora.merge_lora(model)
    lora.merge_lora(model)                                  # twice: a no-op, not a double add
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    lora.unmerge_lora(model)
    lora.unmerge_lora(model)
    torch.testing.assert_close(model.blocks[0]["q"].base.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training():
    """drop(x) is random in train mode and the identity in eval mode."""
    model = adapted(dropout=0.5)
    randomize_B(model)
    x = torch.randn(2, 3, 12)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_param_count_formula_and_only_adapters_train():
    """r * (d_in + d_out) trainable parameters per layer, all in A and B; the base gets no grad."""
    model = adapted(r=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == 2 * 4 * ((12 + 12) + (12 + 36) + (36 + 12))
    model(torch.randn(2, 3, 12)).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)


def test_param_count_reproduces_the_align_lora_paper_figure_on_meta():
    """LoRA r=8 on Qwen2.5-7B's MLP (28 layers, d 3584, ffn 18944): 15,138,816 trainable, the
    Align-LoRA paper's parameter figure."""
    with torch.device("meta"):
        layers = nn.ModuleList(nn.ModuleDict(dict(
            gate_proj=nn.Linear(3584, 18944, bias=False),
            up_proj=nn.Linear(3584, 18944, bias=False),
            down_proj=nn.Linear(18944, 3584, bias=False))) for _ in range(28))
    assert len(lora.add_lora(layers, targets=["gate_proj", "up_proj", "down_proj"], r=8)) == 84
    assert sum(p.numel() for p in layers.parameters() if p.requires_grad) == 15_138_816
