"""What multi-head LoRA computes: a shared A, N heads B_i, h = W0 x + s * sum_i w_i B_i A drop(x),
with w = softmax(W_r x) (HydraLoRA) or w_i = 1/N and a dropout mask per head (M-LoRA); M-LoRA's
merged W; the parameter counts (guards: tests/test_multihead_lora_guards.py)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import multihead_lora as mh
from helpers import Tiny


def adapted(router=True, r=4, n_heads=3, alpha=8.0, seed=0, **kw):
    torch.manual_seed(seed)
    model = Tiny()
    mh.add_multihead_lora(model, targets=["q", "up", "down"], r=r, n_heads=n_heads, alpha=alpha,
                          router=router, **kw)
    return model


def randomize_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _, m in mh.multihead_layers(model):
        m.lora_B.data = torch.randn(m.lora_B.shape, generator=g)


def reference(layer, x, masks=None):
    """Plain loop over samples and heads: W0 x + s * sum_i w_i B_i z_i, z_i = A x (masked),
    minus s * B0 A0 x with init="offset"."""
    A, B, N, s = layer.lora_A.weight, layer.lora_B, layer.n_heads, layer.scaling
    outs = []
    for b in range(x.shape[0]):
        xb = x[b]                                                       # (L, d_in)
        h = xb @ layer.base.weight.T + layer.base.bias
        if layer.router is not None:
            w = torch.softmax(xb @ layer.router.weight.T, dim=-1)       # (L, N)
        else:
            w = torch.full((xb.shape[0], N), 1.0 / N)
        for i in range(N):
            z = xb @ A.T
            if masks is not None:
                z = z * masks[b, :, i]
            h = h + s * w[:, i:i + 1] * (z @ B[i].T)
        if getattr(layer, "lora_A0", None) is not None:                # init="offset"
            h = h - s * (xb @ layer.lora_A0.T @ layer.lora_B0.T)
        outs.append(h)
    return torch.stack(outs)


def per_layer(d_in, d_out, r, N, router):
    """Trainable parameters of one layer: A, the N heads B_i, the router W_r."""
    return r * d_in + N * r * d_out + (N * d_in if router else 0)


VARIANTS = [dict(router=True), dict(router=False), dict(router=False, init="offset")]
MLORA = VARIANTS[1:]                                  # router-free: init "zero" (default), "offset"


@pytest.mark.parametrize("kw", VARIANTS)
@pytest.mark.parametrize("shape", [(3, 5), (3, 1), (4, 2)])
def test_vectorized_forward_equals_loop(kw, shape):
    """h = W0 x + s * sum_i w_i B_i A x (- s B0 A0 x): the layer equals a loop (samples, heads)."""
    torch.manual_seed(0)
    layer = mh.MultiHeadLoRALinear(nn.Linear(10, 6), r=3, n_heads=4, alpha=6.0, dropout=0.3, **kw)
    layer.eval()
    layer.lora_B.data.normal_()
    x = torch.randn(*shape, 10)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(layer, x))
        torch.testing.assert_close(layer(x[0, 0]), reference(layer, x[:1, :1])[0, 0])  # 1-D input


@pytest.mark.parametrize("kw", VARIANTS)
@pytest.mark.parametrize("train", [True, False])
def test_noop_at_init_and_init_distribution(kw, train):
    """Each variant starts at the base model, in train and eval; the inits of A, B_i, A0, B0."""
    torch.manual_seed(0)
    base = Tiny()
    x = torch.randn(3, 7, 12)
    ref = base(x)
    names = mh.add_multihead_lora(base, targets=["q", "up", "down"], **kw)
    assert names == [f"blocks.{i}.{t}" for i in range(2) for t in ["q", "up", "down"]]
    base.train(train)
    if kw.get("init") == "offset":                 # the start is subtracted: equal to rounding
        torch.testing.assert_close(base(x), ref, atol=1e-6, rtol=1e-6)
    else:
        assert torch.equal(base(x), ref)
    for _, m in mh.multihead_layers(base):
        bound = 1 / math.sqrt(m.base.in_features)
        assert m.lora_A.weight.abs().max() <= bound and m.lora_A.weight.std() > bound / 4
        assert (m.router is not None) == kw["router"] and m.scaling == 32.0 / 4
        assert m.lora_B.shape == (3, m.base.out_features, 4)
        if kw.get("init") == "offset":             # nn.Linear(r, d_out)'s init: U(+-1/sqrt(r))
            assert m.lora_B.abs().max() <= 0.5 and m.lora_B.std() > 0.5 / 4
            assert torch.equal(m.lora_A0, m.lora_A.weight)
            assert torch.equal(m.lora_B0, m.lora_B.mean(0))
        else:
            assert torch.count_nonzero(m.lora_B) == 0 and getattr(m, "lora_A0", None) is None


def test_mlora_is_hydra_with_a_uniform_router():
    """M-LoRA is HydraLoRA with its router frozen at w_i = 1/N (softmax of zero logits)."""
    torch.manual_seed(0)
    hydra = mh.MultiHeadLoRALinear(nn.Linear(10, 6), router=True)
    mlora = mh.MultiHeadLoRALinear(hydra.base, router=False)
    hydra.lora_B.data.normal_()
    mlora.load_state_dict(hydra.state_dict(), strict=False)
    nn.init.zeros_(hydra.router.weight)                              # softmax(0) = 1/N
    x = torch.randn(4, 10)
    torch.testing.assert_close(hydra(x), mlora(x))


def test_routed_dropout_acts_on_x_not_on_router_input():
    """HydraLoRA: the router reads the un-dropped x, the adapter the dropped one."""
    torch.manual_seed(0)
    layer = mh.MultiHeadLoRALinear(nn.Linear(10, 6), r=3, n_heads=2, router=True, dropout=0.5)
    layer.lora_B.data.normal_()
    x = torch.randn(2, 5, 10)
    with mh.record_routing(nn.Sequential(layer)) as rec:
        torch.manual_seed(3)
        out = layer(x)
    torch.manual_seed(3)
    xd = F.dropout(x.reshape(10, 10), 0.5, training=True).view(2, 5, 10)
    torch.testing.assert_close(rec["0"], torch.softmax(x @ layer.router.weight.T, -1))
    z = xd @ layer.lora_A.weight.T                                   # (2, 5, r)
    delta = torch.einsum("bln,nor,blr->blo", rec["0"], layer.lora_B, z)
    torch.testing.assert_close(out, layer.base(x) + layer.scaling * delta)


@pytest.mark.parametrize("kw", MLORA)
def test_mlora_train_dropout_one_mask_per_head(kw):
    """M-LoRA in training: each head drops its own mask of A x; eval is deterministic."""
    torch.manual_seed(0)
    layer = mh.MultiHeadLoRALinear(nn.Linear(10, 6), r=3, n_heads=4, alpha=6.0, dropout=0.5, **kw)
    layer.lora_B.data.normal_()
    x = torch.randn(2, 5, 10)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)                            # the same draw, as a mask (M, N, r)
    masks = F.dropout(torch.ones(10, 4, 3), 0.5, training=True).view(2, 5, 4, 3)
    assert not torch.equal(masks[..., 0, :], masks[..., 1, :])      # heads get different masks
    with torch.no_grad():
        torch.testing.assert_close(out, reference(layer, x, masks))
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_router_gradient_zero_at_init_then_nonzero():
    """The pitfall: while every B_i = 0 the router's gradient is zero (dh/dw_i = s B_i A x)."""
    layer = mh.MultiHeadLoRALinear(nn.Linear(10, 6), router=True)
    x = torch.randn(4, 3, 10)
    layer(x).square().sum().backward()
    grad = layer.router.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0
    assert torch.count_nonzero(layer.lora_B.grad) > 0
    layer.zero_grad()
    layer.lora_B.data.normal_()
    layer(x).square().sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kw", MLORA)
def test_mlora_merge_unmerge_equivalence_and_idempotence(kw):
    """Merged W = W0 + s (mean_i(B_i) A - B0 A0) gives the unmerged outputs; unmerge, W0 again."""
    model = adapted(dropout=0.2, **kw).eval()
    randomize_B(model)
    x = torch.randn(2, 5, 12)
    w0 = model.blocks[0]["q"].base.weight.clone()
    unmerged = model(x)
    mh.merge_multihead_lora(model)
    mh.merge_multihead_lora(model)                         # twice: a no-op, not a double add
    assert all(m.merged for _, m in mh.multihead_layers(model))
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    mh.unmerge_multihead_lora(model)
    mh.unmerge_multihead_lora(model)
    torch.testing.assert_close(model.blocks[0]["q"].base.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


def test_mlora_heads_stay_identical_without_dropout_and_split_with_it():
    """M-LoRA, B = 0: no dropout, equal head gradients (plain LoRA); dropout splits the heads."""
    for dropout, same in [(0.0, True), (0.3, False)]:
        model = adapted(router=False, dropout=dropout)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(4, 3, 12)).square().mean().backward()
            opt.step()
        B = model.blocks[0]["up"].lora_B
        assert B.abs().sum() > 0 and torch.allclose(B[0], B[1]) == same
        sims = mh.head_similarity(model)
        assert all((abs(v - 1) < 1e-5) == same for v in sims.values())


def test_offset_heads_differ_at_init_and_split_when_trained_without_dropout():
    """init="offset": the heads differ from the start and take equal steps (the mean's gradient)."""
    model = adapted(router=False, init="offset")
    sims = mh.head_similarity(model)
    assert all(abs(v) < 0.5 for v in sims.values())       # random heads: far from identical
    B = model.blocks[0]["up"].lora_B
    assert not torch.equal(B[0], B[1])
    before = B.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.zero_grad()
    model(torch.randn(4, 3, 12)).square().mean().backward()
    opt.step()
    step = B.detach() - before                             # equal steps: the mean's gradient
    torch.testing.assert_close(step[0], step[1])
    assert step.abs().sum() > 0 and not torch.equal(B[0], B[1])


def test_head_similarity_on_hand_made_heads():
    """head_similarity: mean pairwise cosine of heads B_i (1 identical, 0 orthogonal, nan zero)."""
    model = adapted(router=False, n_heads=3)
    assert all(math.isnan(v) for v in mh.head_similarity(model).values())    # all-zero at init
    B0 = torch.randn(12, 4)
    layers = dict(mh.multihead_layers(model))
    layers["blocks.0.q"].lora_B.data = B0.expand(3, 12, 4).clone()           # identical
    eye = torch.eye(48)[:3].view(3, 12, 4)
    layers["blocks.0.up"].lora_B.data = torch.cat([eye, eye, eye], dim=1)    # orthogonal
    g = torch.randn(3, 12, 4)
    layers["blocks.1.q"].lora_B.data = g
    sims = mh.head_similarity(model)
    assert sims["blocks.0.q"] == pytest.approx(1.0, abs=1e-6)
    assert sims["blocks.0.up"] == pytest.approx(0.0, abs=1e-7)
    ref = [F.cosine_similarity(g[i].flatten(), g[j].flatten(), dim=0)
           for i in range(3) for j in range(3) if i != j]
    assert sims["blocks.1.q"] == pytest.approx(float(sum(ref) / 6), abs=1e-6)
    assert math.isnan(sims["blocks.1.up"])
    assert all(math.isnan(v) for v in mh.head_similarity(adapted(n_heads=1)).values())


def test_routing_table_equals_loop():
    """routing_table: per task, the mean router weights over its kept tokens and layers (a loop)."""
    g = torch.Generator().manual_seed(0)
    Bsz, L, N, T = 5, 4, 3, 4
    records = {f"l{k}": torch.rand(Bsz, L, N, generator=g).softmax(-1) for k in range(3)}
    task_ids = torch.tensor([0, 2, 0, 1, 2])
    mask = torch.rand(Bsz, L, generator=g) > 0.3
    mask[3] = False                                          # task 1 has no kept token
    table = mh.routing_table(records, task_ids, T, mask)
    for t in range(T):
        rows = [records[k][b, l] for k in records for b in range(Bsz) for l in range(L)
                if task_ids[b] == t and mask[b, l]]
        if rows:
            torch.testing.assert_close(table[t], torch.stack(rows).mean(0))
        else:
            assert torch.isnan(table[t]).all()
    full = mh.routing_table(records, task_ids, T)
    torch.testing.assert_close(full[0], torch.stack([records[k][b] for k in records
                                                     for b in (0, 2)]).mean((0, 1)))


@pytest.mark.parametrize("router", [True, False])
def test_param_counts_and_only_adapters_train(router):
    """r*d_in + N*r*d_out (+ N*d_in router) trainable per layer, all in the adapters."""
    model = adapted(router=router, r=4, n_heads=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 2)[-2:][0] in ("lora_A", "router") or
                             n.endswith(".lora_B") for n in trainable)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == 2 * sum(per_layer(i, o, 4, 3, router) for i, o in [(12, 12), (12, 36), (36, 12)])
    model(torch.randn(2, 3, 12)).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


@pytest.mark.parametrize("kw, expected", [(MLORA[0], 16_859_136), (MLORA[1], 16_859_136),
                                         (dict(router=True), 19_052_544)])
def test_param_counts_qwen25_7b_mlp_on_meta(kw, expected):
    """Qwen2.5-7B's MLP (28 layers, d 3584, ffn 18944), r=4, N=3: the Align-LoRA paper's
    parameter figures for M-LoRA and HydraLoRA; the offset's A0, B0 are buffers, not parameters."""
    router = kw["router"]
    with torch.device("meta"):
        layers = nn.ModuleList(nn.ModuleDict(dict(
            gate_proj=nn.Linear(3584, 18944, bias=False),
            up_proj=nn.Linear(3584, 18944, bias=False),
            down_proj=nn.Linear(18944, 3584, bias=False))) for _ in range(28))
    names = mh.add_multihead_lora(layers, targets=["gate_proj", "up_proj", "down_proj"], r=4,
                                  n_heads=3, **kw)
    assert len(names) == 84
    n = sum(p.numel() for p in layers.parameters() if p.requires_grad)
    assert n == expected == 28 * (2 * per_layer(3584, 18944, 4, 3, router)
                                  + per_layer(18944, 3584, 4, 3, router))
