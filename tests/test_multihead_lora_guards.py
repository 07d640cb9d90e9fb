"""multihead_lora.py's guards: bad input raising ValueError, and the engineering (state dicts,
merging bookkeeping, routing hooks, dtypes, building on meta). What it computes:
tests/test_multihead_lora.py."""
import contextlib
import math

import pytest
import torch
import torch.nn as nn

import multihead_lora as mh
from helpers import Tiny, quantized_tiny
from test_lora_guards import wrapped_for
from test_multihead_lora import MLORA, VARIANTS, adapted, randomize_B


# ----------------------------------------------------------------------------- bad input

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
                                     (dict(targets=["blocks"]), "not an nn.Linear"),
                                     (dict(fp32_adapter="False"), "fp32_adapter must be True")])
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
     "mask: bool or integers of shape \\(2, 3\\)")])
def test_routing_table_bad_inputs(args, msg):
    with pytest.raises(ValueError, match=msg):
        mh.routing_table(*args)


def test_routing_table_takes_lists_numpy_arrays_and_integer_masks():
    """As the README says, ids and masks may be lists (a list mask raised AttributeError) and a
    mask may be integer (mask != 0, as HF's attention_mask): the table of the bool tensor mask."""
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    w, ids = {"a": torch.rand(3, 4, 2).softmax(-1)}, torch.tensor([0, 1, 1])
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    ref = mh.routing_table(w, ids, 2, mask)
    for i, m in [(ids.tolist(), mask.tolist()), (ids.numpy(), mask.numpy()),
                 (ids, mask.long()), (ids, mask.int().numpy() * 7)]:
        assert torch.equal(mh.routing_table(w, i, 2, m), ref)
    assert np.asarray(mask).dtype == np.bool_


# ----------------------------------------------------------------------------- state dicts, merging

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


def test_state_dict_skips_host_layers_named_like_adapters():
    model = adapted(router=True)
    model.blocks[0].router = nn.Linear(12, 3)                # a host layer, not an adapter
    state = mh.multihead_state_dict(model)
    assert "blocks.0.router.weight" not in state and len(state) == 18


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


# ----------------------------------------------------------------------------- routing hooks

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


def test_a_deepcopy_inside_record_routing_does_not_overwrite_the_records():
    """copy.deepcopy of the model (e.g. an EMA) inside the block carries the routers' hooks; the
    copy's forward used to overwrite the original's records: the hooks skip the copy's routers."""
    import copy
    model, x = adapted(router=True), torch.randn(2, 5, 12)
    with mh.record_routing(model) as rec:
        model(x)
        want = dict(rec)
        twin = copy.deepcopy(model)
        with torch.no_grad():
            for _, m in mh.multihead_layers(twin):
                m.router.weight.mul_(-1)
        twin(x)
    assert rec.keys() == want.keys() and all(torch.equal(rec[k], want[k]) for k in rec)


# ----------------------------------------------------------------------------- dtypes and devices

@pytest.mark.parametrize("router", [False, True])
def test_a_quantized_base_gets_fp32_adapters_and_merging_is_refused_before_any_change(router):
    """An nn.Linear with an integer weight (bitsandbytes' 4/8-bit: tests/test_quantized.py): fp32
    adapters, the start is the base; a router-free merge would write a float update into the
    integer weight: refused before any layer changes (routed layers refuse as always)."""
    torch.manual_seed(0)
    model, x = quantized_tiny(["down"]), torch.randn(2, 3, 12)
    want = model(x)
    mh.add_multihead_lora(model, ["q", "up", "down"], r=4, router=router)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert torch.equal(model(x), want)
    randomize_B(model)
    adapted_out, weights = model(x), [p.clone() for p in model.parameters()]
    msg = "routed" if router else (r"cannot merge into a quantized weight \(Int8Linear, torch.int8"
                                   r"\): dequantize .* then merge_and_unload_multihead_lora")
    for merge in (lambda: mh.merge_multihead_lora(model),
                  lambda: mh.merge_and_unload_multihead_lora(model),
                  model.blocks[0]["down"].merge):
        with pytest.raises(ValueError, match=msg):
            merge()
    assert not any(m.merged for _, m in mh.multihead_layers(model))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))
    assert torch.equal(model(x), adapted_out)


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


def test_merge_bf16_base_stays_close():
    torch.manual_seed(0)
    layer = mh.MultiHeadLoRALinear(nn.Linear(32, 16), router=False).float()
    layer.base.to(torch.bfloat16)
    layer.lora_B.data.normal_(std=0.1)
    x = torch.randn(8, 32).to(torch.bfloat16)
    unmerged = layer(x).float()
    layer.merge()
    assert (layer(x).float() - unmerged).abs().max() < 0.1


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


# ----------------------------------------------------------------------------- data parallelism

@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_a_model_wrapped_for_data_parallelism_is_refused_naming_the_order(engine):
    """Wrapped first, each process would train an adapter of its own: adapt, then wrap."""
    with wrapped_for(engine, Tiny()) as model:
        with pytest.raises(ValueError, match="adapt the plain model first, then wrap it"):
            mh.add_multihead_lora(model, targets=["q"])
        assert not mh.multihead_layers(model)
