import contextlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import multihead_lora as mh
from tiny import Tiny


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


VARIANTS = [dict(router=True), dict(router=False), dict(router=False, init="offset")]
MLORA = VARIANTS[1:]                                  # router-free: init "zero" (default), "offset"


@pytest.mark.parametrize("kw", VARIANTS)
@pytest.mark.parametrize("train", [True, False])
def test_noop_at_init_and_init_distribution(kw, train):
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


@pytest.mark.parametrize("kw", VARIANTS)
@pytest.mark.parametrize("shape", [(3, 5), (3, 1), (4, 2)])
def test_vectorized_forward_equals_loop(kw, shape):
    torch.manual_seed(0)
    layer = mh.MultiHeadLoRALinear(nn.Linear(10, 6), r=3, n_heads=4, alpha=6.0, dropout=0.3, **kw)
    layer.eval()
    layer.lora_B.data.normal_()
    x = torch.randn(*shape, 10)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(layer, x))
        torch.testing.assert_close(layer(x[0, 0]), reference(layer, x[:1, :1])[0, 0])  # 1-D input


@pytest.mark.parametrize("kw", MLORA)
def test_mlora_train_dropout_one_mask_per_head(kw):
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


def test_routed_dropout_acts_on_x_not_on_router_input():
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


def test_mlora_is_hydra_with_a_uniform_router():
    torch.manual_seed(0)
    hydra = mh.MultiHeadLoRALinear(nn.Linear(10, 6), router=True)
    mlora = mh.MultiHeadLoRALinear(hydra.base, router=False)
    hydra.lora_B.data.normal_()
    mlora.load_state_dict(hydra.state_dict(), strict=False)
    nn.init.zeros_(hydra.router.weight)                              # softmax(0) = 1/N
    x = torch.randn(4, 10)
    torch.testing.assert_close(hydra(x), mlora(x))


def test_router_gradient_zero_at_init_then_nonzero():
    layer = mh.MultiHeadLoRALinear(nn.Linear(10, 6), router=True)
    x = torch.randn(4, 3, 10)
    layer(x).square().sum().backward()
    assert layer.router.weight.grad is not None and torch.count_nonzero(layer.router.weight.grad) == 0
    assert torch.count_nonzero(layer.lora_B.grad) > 0
    layer.zero_grad()
    layer.lora_B.data.normal_()
    layer(x).square().sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_mlora_heads_stay_identical_without_dropout_and_split_with_it():
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


@pytest.mark.parametrize("kw", MLORA)
def test_mlora_merge_unmerge_equivalence_and_idempotence(kw):
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


def test_routed_merge_raises_and_touches_nothing():
    model = adapted(router=True)
    randomize_B(model)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.blocks[0]["q"].merge()
    w = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="cannot be merged"):
        mh.merge_multihead_lora(model)
    assert all(torch.equal(p, w[n]) for n, p in model.named_parameters())
    mixed = adapted(router=False)                         # one routed layer among mergeable ones
    mh.add_multihead_lora(mixed, targets=["head"], router=True)
    w = {n: p.clone() for n, p in mixed.named_parameters()}
    with pytest.raises(ValueError, match="cannot be merged"):
        mh.merge_multihead_lora(mixed)
    assert all(torch.equal(p, w[n]) for n, p in mixed.named_parameters())
    assert not any(m.merged for _, m in mh.multihead_layers(mixed))


def test_merge_bf16_base_stays_close():
    torch.manual_seed(0)
    layer = mh.MultiHeadLoRALinear(nn.Linear(32, 16), router=False).float()
    layer.base.to(torch.bfloat16)
    layer.lora_B.data.normal_(std=0.1)
    x = torch.randn(8, 32).to(torch.bfloat16)
    unmerged = layer(x).float()
    layer.merge()
    assert (layer(x).float() - unmerged).abs().max() < 0.1


def per_layer(d_in, d_out, r, N, router):
    return r * d_in + N * r * d_out + (N * d_in if router else 0)


@pytest.mark.parametrize("router", [True, False])
def test_param_counts_and_only_adapters_train(router):
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
    """Qwen2.5-7B's MLP (28 layers, d 3584, ffn 18944), r=4, N=3 (METHODS.md); the offset's
    A0, B0 are buffers, not parameters."""
    router = kw["router"]
    with torch.device("meta"):
        layers = nn.ModuleList(nn.ModuleDict(dict(
            gate_proj=nn.Linear(3584, 18944, bias=False), up_proj=nn.Linear(3584, 18944, bias=False),
            down_proj=nn.Linear(18944, 3584, bias=False))) for _ in range(28))
    names = mh.add_multihead_lora(layers, targets=["gate_proj", "up_proj", "down_proj"], r=4,
                                  n_heads=3, **kw)
    assert len(names) == 84
    n = sum(p.numel() for p in layers.parameters() if p.requires_grad)
    assert n == expected == 28 * (2 * per_layer(3584, 18944, 4, 3, router)
                                  + per_layer(18944, 3584, 4, 3, router))


@pytest.mark.parametrize("kw", VARIANTS)
def test_state_dict_round_trip(tmp_path, kw):
    model = adapted(seed=0, **kw)
    randomize_B(model)
    state = mh.multihead_state_dict(model)
    keys = {"router": ["lora_A.weight", "lora_B", "router.weight"],
            "offset": ["lora_A.weight", "lora_B", "lora_A0", "lora_B0"]}.get(
        "router" if kw["router"] else kw.get("init"), ["lora_A.weight", "lora_B"])
    assert sorted(state) == sorted(f"blocks.{i}.{t}.{k}" for i in range(2)
                                   for t in ("q", "up", "down") for k in keys)
    torch.save(state, tmp_path / "a.pt")
    fresh = adapted(seed=0, **kw)                          # same base weights, fresh adapters
    if "init" in kw:                                       # a draw of its own, also of A0, B0
        torch.manual_seed(5)
        for _, m in mh.multihead_layers(fresh):
            m.reset_parameters()
    for p in fresh.parameters():
        if p.requires_grad:
            p.data.normal_()
    before = mh.multihead_state_dict(fresh)
    assert all(not torch.equal(before[k], v) for k, v in state.items())
    mh.load_multihead_state_dict(fresh, torch.load(tmp_path / "a.pt"))
    x = torch.randn(2, 4, 12)
    for train in (True, False):
        assert torch.equal(fresh.train(train)(x), model.train(train)(x))


def test_load_rejects_mismatch():
    state = mh.multihead_state_dict(adapted(r=4))
    for other in [adapted(r=2), adapted(n_heads=2), adapted(router=False), Tiny()]:
        with pytest.raises(ValueError, match="adapted alike"):
            mh.load_multihead_state_dict(other, state)
    zero = mh.multihead_state_dict(adapted(router=False))
    with pytest.raises(ValueError, match="lora_A0"):                  # init differs
        mh.load_multihead_state_dict(adapted(router=False, init="offset"), zero)
    merged = adapted(router=False)
    mh.merge_multihead_lora(merged)
    with pytest.raises(ValueError, match="unmerged"):
        mh.load_multihead_state_dict(merged, zero)


def test_head_similarity_on_hand_made_heads():
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


def test_record_routing_keeps_no_layer_state_and_removes_its_hooks():
    model = adapted(router=True)
    x = torch.randn(2, 5, 12)
    layers = mh.multihead_layers(model)
    state = [set(vars(m)) for _, m in layers]
    with mh.record_routing(model) as rec:
        assert all(m.router._forward_hooks for _, m in layers)
        model(x)
    assert sorted(rec) == sorted(n for n, _ in layers)
    for (name, m), keys in zip(layers, state):
        assert rec[name].shape == (2, 5, 3) and not rec[name].requires_grad
        assert rec[name].dtype == torch.float32
        torch.testing.assert_close(rec[name].sum(-1), torch.ones(2, 5))
        assert not m.router._forward_hooks and not m._forward_hooks and set(vars(m)) == keys
        assert not hasattr(m, "record") and not hasattr(m, "last_weights")
    q0 = model.blocks[0]["q"]
    torch.testing.assert_close(rec["blocks.0.q"], torch.softmax(x @ q0.router.weight.T, -1))
    model(x)                                              # outside the block: nothing recorded
    assert rec["blocks.0.q"].shape == (2, 5, 3) and len(rec) == len(layers)
    with pytest.raises(KeyError):                         # an error inside: hooks still removed
        with mh.record_routing(model):
            raise KeyError("boom")
    assert not any(m.router._forward_hooks for _, m in layers)
    with pytest.raises(ValueError, match="no routed"):
        with mh.record_routing(adapted(router=False)):
            pass


def test_routing_table_equals_loop():
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


@pytest.mark.parametrize("args, msg", [
    (({}, torch.tensor([0, 1]), 2), "non-empty"),
    (({"a": torch.rand(2, 3, 3), "b": torch.rand(2, 3, 2)}, torch.tensor([0, 1]), 2), "one shape"),
    (({"a": torch.rand(2, 3, 3)}, torch.tensor([0, 1, 1]), 2), "int64 \\(3,\\)"),
    (({"a": torch.rand(2, 3, 3)}, torch.tensor([0.0, 1.0]), 2), "task_ids torch.float32"),
    (({"a": torch.rand(2, 3, 3)}, torch.tensor([0, 2]), 2), "in \\[0, n_tasks\\)"),
    (({"a": torch.rand(2, 3, 3)}, torch.tensor([0, -1]), 2), "in \\[0, n_tasks\\)"),
    (({"a": torch.rand(2, 3, 3)}, torch.tensor([0, 1]), 0), "n_tasks=0"),
    (({"a": torch.rand(2, 3, 3)}, torch.tensor([0, 1]), 2, torch.ones(2, 3)), "mask torch.float32"),
    (({"a": torch.rand(2, 3, 3)}, torch.tensor([0, 1]), 2, torch.ones(3, 2, dtype=torch.bool)),
     "mask: bool of shape \\(2, 3\\)")])
def test_routing_table_bad_inputs(args, msg):
    with pytest.raises(ValueError, match=msg):
        mh.routing_table(*args)


@pytest.mark.parametrize("kw, msg", [(dict(targets=["nope"]), "match no layer"),
                                     (dict(targets=[]), "targets must be"),
                                     (dict(r=0), "rank"), (dict(r=2.5), "rank"),
                                     (dict(n_heads=0), "n_heads"), (dict(n_heads=2.0), "n_heads"),
                                     (dict(alpha=0), "alpha"), (dict(dropout=1.0), "dropout"),
                                     (dict(alpha=float("inf")), "alpha"),
                                     (dict(alpha=float("nan")), "alpha"),
                                     (dict(dropout=float("nan")), "dropout"),
                                     (dict(dropout=-0.1), "dropout"),
                                     (dict(init="random", router=False), "init"),
                                     (dict(init="offset", router=True), "init in \\('zero',\\)"),
                                     (dict(targets=["blocks"]), "not an nn.Linear")])
def test_bad_inputs_raise(kw, msg):
    args = dict(targets=["q"], r=4) | kw
    model = Tiny()
    with pytest.raises(ValueError, match=msg):
        mh.add_multihead_lora(model, **args)
    assert not mh.multihead_layers(model) and all(p.requires_grad for p in model.parameters())


def test_offset_init_is_refused_for_routed_layers():
    with pytest.raises(ValueError, match="router=True"):
        mh.MultiHeadLoRALinear(nn.Linear(4, 4), router=True, init="offset")


def test_n_heads_one_adapting_twice_wrong_width_and_multihead_attention():
    model = adapted(n_heads=1)
    assert model(torch.randn(2, 12)).shape == (2, 5)
    with pytest.raises(ValueError, match="adapt each layer once"):
        mh.add_multihead_lora(model, targets=["q"])
    with pytest.raises(RuntimeError):                      # nn.Linear's own error on x's width
        model.blocks[0]["q"](torch.randn(2, 7))
    enc = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    with pytest.raises(ValueError, match="MultiheadAttention"):
        mh.add_multihead_lora(enc, targets=["out_proj"])


@pytest.mark.parametrize("target", ["base", "router", "lora_A"])
def test_layers_inside_an_adapter_are_refused(target):
    model = adapted(router=True)
    with pytest.raises(ValueError, match="adapt each layer once"):
        mh.add_multihead_lora(model, targets=[target])
    assert not any(isinstance(m.base, mh.MultiHeadLoRALinear) or isinstance(
        m.router, mh.MultiHeadLoRALinear) for _, m in mh.multihead_layers(model))


def test_adding_more_adapters_keeps_the_first_ones_trainable():
    torch.manual_seed(0)
    model = Tiny()
    mh.add_multihead_lora(model, targets=["q"], r=2, router=True)
    mh.add_multihead_lora(model, targets=["down"], r=2, router=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.{t}.{k}" for i in range(2) for t, ks in
                         [("q", ["lora_A.weight", "lora_B", "router.weight"]),
                          ("down", ["lora_A.weight", "lora_B"])] for k in ks}


@pytest.mark.parametrize("kw", MLORA)
def test_merged_state_dict_loads_exactly_into_a_fresh_copy(kw):
    model = adapted(**kw)
    randomize_B(model)
    x = torch.randn(2, 3, 12)
    want = model(x)
    mh.merge_multihead_lora(model)
    fresh = adapted(seed=0, **kw)                           # same base, unmerged, fresh adapters
    for p in fresh.parameters():
        if p.requires_grad:
            p.data.normal_()
    fresh.load_state_dict(model.state_dict())
    assert all(m.merged for _, m in mh.multihead_layers(fresh))
    torch.testing.assert_close(fresh(x), want, atol=1e-5, rtol=1e-5)
    mh.unmerge_multihead_lora(fresh)
    torch.testing.assert_close(fresh(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fresh.blocks[0]["q"].base.weight,
                               adapted(router=False).blocks[0]["q"].base.weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kw", MLORA)
def test_unmerge_restores_W0_even_if_the_adapter_changed_while_merged(kw):
    model = adapted(**kw)
    randomize_B(model)
    w0 = model.blocks[0]["q"].base.weight.clone()
    mh.merge_multihead_lora(model)
    randomize_B(model, seed=9)                             # e.g. a checkpoint loaded meanwhile
    for _, m in mh.multihead_layers(model):
        for t in (m.lora_A.weight, getattr(m, "lora_A0", None), getattr(m, "lora_B0", None)):
            if t is not None:
                t.data.normal_()
    mh.unmerge_multihead_lora(model)
    torch.testing.assert_close(model.blocks[0]["q"].base.weight, w0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kw", VARIANTS)
def test_reset_parameters_after_building_on_meta(kw):
    with torch.device("meta"):
        model = Tiny()
        mh.add_multihead_lora(model, targets=["q", "up"], **kw)
    model.to_empty(device="cpu")
    model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    x = torch.randn(2, 3, 12)
    for _, m in mh.multihead_layers(model):
        assert m.lora_A.weight.abs().max() <= 1 / math.sqrt(m.base.in_features)
        assert m.lora_A.weight.abs().sum() > 0
        if kw.get("init") == "offset":
            assert torch.equal(m.lora_B0, m.lora_B.mean(0)) and m.lora_B.abs().sum() > 0
        else:
            assert torch.count_nonzero(m.lora_B) == 0
        xi = x if m.base.in_features == 12 else x.repeat(1, 1, 3)
        if kw.get("init") == "offset":                     # start subtracted: equal to rounding
            torch.testing.assert_close(m(xi), m.base(xi), atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(m(xi), m.base(xi))


def test_offset_heads_differ_at_init_and_split_when_trained_without_dropout():
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


def test_docstring_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    block = mh.__doc__.split("(no edits to its code):\n")[1].split("\n\n")[0]
    exec(compile(__import__("textwrap").dedent(block), "multihead_lora docstring", "exec"), {})
    assert (tmp_path / "adapter.pt").exists()


@pytest.mark.parametrize("kw", VARIANTS)
def test_dtypes_under_autocast_and_bf16_base(kw):
    model = adapted(dropout=0.1, **kw)
    router = kw["router"]
    randomize_B(model)
    x = torch.randn(2, 3, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with mh.record_routing(model) if router else contextlib.nullcontext({}) as rec:
            out = model(x)
    assert out.dtype == torch.bfloat16
    if router:
        assert all(w.dtype == torch.float32 for w in rec.values())
    for _, m in mh.multihead_layers(model):
        m.base.to(torch.bfloat16)
    model.head.to(torch.bfloat16)
    assert model(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert model.blocks[0]["q"].lora_B.dtype == torch.float32


def test_state_dict_skips_host_layers_named_like_adapters():
    model = adapted(router=True)
    model.blocks[0].router = nn.Linear(12, 3)                # a host layer, not an adapter
    state = mh.multihead_state_dict(model)
    assert "blocks.0.router.weight" not in state and len(state) == 18
