import math
import textwrap

import pytest
import torch
import torch.nn as nn

import mtl_lora
from tiny import Tiny

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


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("shape", [(6, 10), (6, 4, 10), (6, 2, 3, 10)])
def test_vectorized_forward_equals_per_sample_loop(diagonal, shape):
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


def test_noop_at_init_and_init_values():
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
        other = (t + 1) % T
        with pytest.raises(ValueError, match="unmerge"):
            mtl_lora.merge_mtl_lora(model, other)
        with pytest.raises(RuntimeError, match="merged for one task"):    # refused at entry
            with mtl_lora.task_ids(model, torch.tensor([t, other])):
                pass
        mtl_lora.unmerge_mtl_lora(model)
        mtl_lora.unmerge_mtl_lora(model)
        torch.testing.assert_close(model.blocks[0]["q"].base.weight, w0, atol=1e-6, rtol=0)
        assert all(m.merged_task is None for m in mtl_lora.mtl_layers(model))


def test_merged_weight_equals_formula_and_bad_task():
    torch.manual_seed(0)
    layer = mtl_lora.MTLLoRALinear(nn.Linear(8, 6), n_tasks=T, r=2, diagonal=True)
    randomize(layer)
    with torch.no_grad():
        expected = reference_weight(layer, 1)
    layer.merge(1)
    torch.testing.assert_close(layer.base.weight, expected, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    for bad in (T, -1, 1.0, True):
        with pytest.raises(ValueError, match="merge needs one task id"):
            layer.merge(bad)


def count(m):
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("diagonal", [False, True])
def test_param_count_formula_and_only_adapters_train(diagonal):
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
    with torch.device("meta"):
        blocks = nn.ModuleList(nn.ModuleDict({t: nn.Linear(4096, 4096, bias=False) for t in "qkvo"})
                               for _ in range(32))
        mtl_lora.add_mtl_lora(blocks, 8, targets=["q", "k", "v", "o"], r=8, n_up=3)
    assert count(blocks[0]["q"]) == 131_608
    assert count(blocks) == 16_845_824


def test_state_dict_round_trip(tmp_path):
    model = adapted(seed=0)
    randomize(model)
    state = mtl_lora.mtl_state_dict(model)
    assert len(state) == 6 * 4 and all(".lora_" in k for k in state)
    torch.save(state, tmp_path / "a.pt")
    fresh = adapted(seed=0)                       # same base weights, fresh adapters
    randomize(fresh, seed=5)
    mtl_lora.load_mtl_state_dict(fresh, torch.load(tmp_path / "a.pt"))
    x, ids = torch.randn(3, 4, 12), torch.tensor([1, 0, 2])
    with mtl_lora.task_ids(model, ids), mtl_lora.task_ids(fresh, ids):
        assert torch.equal(fresh(x), model(x))


def test_load_rejects_mismatch_and_merged():
    state = mtl_lora.mtl_state_dict(adapted())
    with pytest.raises(ValueError, match="do not fit.*lora_lambda"):
        mtl_lora.load_mtl_state_dict(adapted(n_tasks=T + 1), state)
    with pytest.raises(ValueError, match="do not fit.*lora_w"):
        mtl_lora.load_mtl_state_dict(adapted(), {k: v for k, v in state.items() if "lora_w" not in k})
    with pytest.raises(ValueError, match="load into a model adapted"):
        mtl_lora.load_mtl_state_dict(Tiny(), state)
    merged = adapted()
    mtl_lora.merge_mtl_lora(merged, 0)
    with pytest.raises(ValueError, match="unmerge_mtl_lora"):
        mtl_lora.load_mtl_state_dict(merged, state)


@pytest.mark.parametrize("ids, err, msg", [
    (torch.tensor([0, 3]), RuntimeError, r"in \[0, n_tasks=3\)"),     # the device-side assert
    (torch.tensor([-1, 0]), RuntimeError, r"in \[0, n_tasks=3\)"),
    (torch.tensor([0.0, 1.0]), ValueError, "integers"),
    (torch.tensor([True, False]), ValueError, "integers"),
    (torch.tensor([[0], [1]]), ValueError, r"shape \(batch,\)"),
    (torch.tensor([0, 1, 2]), ValueError, "batch_first")])
def test_bad_ids_raise(ids, err, msg):
    model = adapted()
    with pytest.raises(err, match=msg):
        with mtl_lora.task_ids(model, ids):
            model(torch.randn(2, 4, 12))


def test_missing_ids_and_batch_second_layout_raise():
    model = adapted()
    with pytest.raises(ValueError, match="with task_ids"):
        model(torch.randn(2, 4, 12))
    with pytest.raises(ValueError, match="no MTL-LoRA layers"):
        with mtl_lora.task_ids(Tiny(), torch.tensor([0])):
            pass
    enc = nn.TransformerEncoderLayer(16, 2, 32)               # batch second: (L, B, d)
    mtl_lora.add_mtl_lora(enc, 2, targets=["linear1", "linear2"], r=2)
    with pytest.raises(ValueError, match="batch_first=True"):
        with mtl_lora.task_ids(enc, torch.tensor([0, 1])):
            enc(torch.randn(5, 2, 16))


def test_ids_cleared_after_context_also_on_exception():
    model = adapted()
    layers = mtl_lora.mtl_layers(model)
    with mtl_lora.task_ids(model, torch.tensor([0, 1], dtype=torch.int32)):
        assert all(m.task_ids.dtype == torch.long and m.task_ids.tolist() == [0, 1] for m in layers)
        with mtl_lora.task_ids(model, [2]):                 # nested: the outer ids come back
            assert layers[0].task_ids.tolist() == [2]
        assert layers[0].task_ids.tolist() == [0, 1]
    assert all(m.task_ids is None for m in layers)
    with pytest.raises(RuntimeError, match="boom"):
        with mtl_lora.task_ids(model, torch.tensor([0, 1])):
            raise RuntimeError("boom")
    assert all(m.task_ids is None for m in layers)
    with pytest.raises(ValueError, match="with task_ids"):
        model(torch.randn(2, 12))


@pytest.mark.parametrize("kw, msg", [(dict(targets=["nope"]), "match no layer"),
                                     (dict(targets=[]), "targets must be"),
                                     (dict(n_tasks=0), "n_tasks=0"), (dict(n_up=0), "n_up=0"),
                                     (dict(tau=0), "tau=0"), (dict(tau=-1.0), "tau=-1.0"),
                                     (dict(tau=math.inf), "tau=inf"), (dict(tau=math.nan), "tau=nan"),
                                     (dict(r=0), "r=0"), (dict(r=2.5), "r=2.5"),
                                     (dict(alpha=0), "alpha=0"), (dict(alpha=math.inf), "alpha=inf"),
                                     (dict(alpha=math.nan), "alpha=nan"),
                                     (dict(dropout=1.0), "dropout=1.0"),
                                     (dict(targets=["blocks"]), "not an nn.Linear")])
def test_bad_hparams_raise(kw, msg):
    args = dict(n_tasks=T, targets=["q"], r=4) | kw
    with pytest.raises(ValueError, match=msg):
        mtl_lora.add_mtl_lora(Tiny(), **args)


def test_mixing_weights():
    model = adapted(tau=0.5)
    randomize(model)
    mix = mtl_lora.mixing_weights(model)
    assert list(mix) == [f"blocks.{i}.{t}" for i in range(2) for t in ["q", "up", "down"]]
    w = model.blocks[1]["up"].lora_w
    p = mix["blocks.1.up"]
    assert p.shape == (T, 3) and p.dtype == torch.float32 and not p.requires_grad
    torch.testing.assert_close(p, torch.exp(2 * w) / torch.exp(2 * w).sum(1, keepdim=True))


def test_sequential_usage_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    example = mtl_lora.__doc__.split("no edits to its code):\n\n")[1].split("\n\n")[0]
    namespace = {}
    exec(textwrap.dedent(example), namespace)
    assert namespace["out"].shape == (4, 4)


def test_dropout_only_in_training_and_dtype_under_autocast():
    model = adapted(dropout=0.5)
    randomize(model)
    x, ids = torch.randn(2, 3, 12), torch.tensor([1, 2])
    with mtl_lora.task_ids(model, ids):
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x).dtype == torch.bfloat16


def test_merged_state_dict_loads_exactly_into_a_fresh_copy(tmp_path):
    model = adapted()
    randomize(model)
    x, ids = torch.randn(2, 3, 12), torch.tensor([1, 1])
    with mtl_lora.task_ids(model, ids):
        want = model(x)
    mtl_lora.merge_mtl_lora(model, 1)
    torch.save(model.state_dict(), tmp_path / "merged.pt")
    fresh = adapted()                                      # same base, unmerged, fresh adapters
    fresh.load_state_dict(torch.load(tmp_path / "merged.pt"))
    assert all(m.merged_task == 1 for m in mtl_lora.mtl_layers(fresh))
    torch.testing.assert_close(fresh(x), want, atol=1e-5, rtol=1e-5)
    mtl_lora.unmerge_mtl_lora(fresh)
    torch.testing.assert_close(fresh.blocks[0]["q"].base.weight, adapted().blocks[0]["q"].base.weight,
                               atol=1e-6, rtol=0)
    with mtl_lora.task_ids(fresh, ids):
        torch.testing.assert_close(fresh(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("diagonal", [False, True])
def test_unmerge_restores_W0_even_if_the_adapter_changed_while_merged(diagonal):
    model = adapted(diagonal=diagonal)
    randomize(model)
    w0 = [m.base.weight.clone() for m in mtl_lora.mtl_layers(model)]
    mtl_lora.merge_mtl_lora(model, 2)
    randomize(model, seed=9)                   # new B, Lam, w and A meanwhile (a checkpoint loaded)
    for m in mtl_lora.mtl_layers(model):
        m.lora_A.weight.data.normal_()
    mtl_lora.unmerge_mtl_lora(model)
    for m, w in zip(mtl_lora.mtl_layers(model), w0):
        torch.testing.assert_close(m.base.weight, w, atol=1e-6, rtol=0)


def test_a_second_call_keeps_the_first_calls_adapters_trainable():
    model = Tiny()
    mtl_lora.add_mtl_lora(model, T, targets=["q"], r=4)
    mtl_lora.add_mtl_lora(model, T, targets=["up"], r=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.{t}.lora_{k}" for i in range(2) for t in ("q", "up")
                         for k in ("A.weight", "lambda", "B", "w")}


@pytest.mark.parametrize("targets", [["q"], ["base"], ["lora_A"], ["q.base"]])
def test_layers_of_an_adapter_are_refused(targets):
    model = adapted()
    with pytest.raises(ValueError, match="adapter"):
        mtl_lora.add_mtl_lora(model, T, targets=targets)
    assert all(type(m.base) is nn.Linear and type(m.lora_A) is nn.Linear
               for m in mtl_lora.mtl_layers(model))


@pytest.mark.parametrize("diagonal", [False, True])
def test_reset_parameters_after_building_on_meta(diagonal):
    with torch.device("meta"):
        model = Tiny()
        mtl_lora.add_mtl_lora(model, T, targets=["q", "up"], r=4, diagonal=diagonal)
    model.to_empty(device="cpu")
    model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    x, ids = torch.randn(2, 3, 12), torch.tensor([0, 2])
    eye = torch.ones(T, 4) if diagonal else torch.eye(4).repeat(T, 1, 1)
    for m in mtl_lora.mtl_layers(model):
        assert torch.count_nonzero(m.lora_B) == 0 and torch.equal(m.lora_lambda, eye)
        assert m.lora_A.weight.abs().max() <= 1 / math.sqrt(12) and m.lora_A.weight.std() > 0.05
        assert m.lora_w.abs().max() <= 1 / math.sqrt(3) and m.lora_w.std() > 0.05
        with mtl_lora.task_ids(m, ids):
            torch.testing.assert_close(m(x), m.base(x), atol=0, rtol=0)


def test_task_ids_and_forward_read_no_tensor_value_on_the_host(monkeypatch):
    """No .item()/.tolist()/bool()/int()/float()/index of a tensor per step: no host sync on a GPU."""
    model = adapted()
    randomize(model)
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        def counted(self, *args, _orig=getattr(torch.Tensor, name), _name=name):
            reads.append(_name)
            return _orig(self, *args)
        monkeypatch.setattr(torch.Tensor, name, counted)
    bool(torch.tensor(True)), torch.tensor([1]).tolist(), [0, 1][torch.tensor(1)]
    assert reads == ["__bool__", "tolist", "__index__"]    # the counting works
    reads.clear()
    x = torch.randn(4, 3, 12)
    with mtl_lora.task_ids(model, torch.tensor([0, 2, 1, 0])):
        model(x).sum().backward()
    mtl_lora.merge_mtl_lora(model, 1)
    with mtl_lora.task_ids(model, torch.tensor([1, 1, 1, 1])):
        model(x)
    assert reads == []
