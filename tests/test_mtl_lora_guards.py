"""mtl_lora.py's guards: bad input raising ValueError, task ids (checked, cleared, read with no host
sync), and the engineering (state dicts, merging bookkeeping, autocast, building on meta). What
MTL-LoRA computes: tests/test_mtl_lora.py."""
import math

import pytest
import torch
import torch.nn as nn

import mtl_lora
from helpers import Tiny, count_host_reads, quantized_tiny
from test_lora_guards import wrapped_for
from test_mtl_lora import T, adapted, randomize


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw, msg", [(dict(targets=["nope"]), "match no layer"),
                                     (dict(targets=[]), "targets must be"),
                                     (dict(n_tasks=0), "n_tasks=0"), (dict(n_up=0), "n_up=0"),
                                     (dict(tau=0), "tau=0"), (dict(tau=-1.0), "tau=-1.0"),
                                     (dict(tau=math.inf), "tau=inf"),
                                     (dict(tau=math.nan), "tau=nan"),
                                     (dict(r=0), "r=0"), (dict(r=2.5), "r=2.5"),
                                     (dict(alpha=0), "alpha=0"),
                                     (dict(alpha=math.inf), "alpha=inf"),
                                     (dict(alpha=math.nan), "alpha=nan"),
                                     (dict(dropout=1.0), "dropout=1.0"),
                                     (dict(targets=["blocks"]), "not an nn.Linear"),
                                     (dict(fp32_adapter="False"), "fp32_adapter must be True")])
def test_bad_hparams_raise(kw, msg):
    args = dict(n_tasks=T, targets=["q"], r=4) | kw
    with pytest.raises(ValueError, match=msg):
        mtl_lora.add_mtl_lora(Tiny(), **args)


@pytest.mark.parametrize("targets", [["q"], ["base"], ["lora_A"], ["q.base"]])
def test_layers_of_an_adapter_are_refused(targets):
    model = adapted()
    with pytest.raises(ValueError, match="adapter"):
        mtl_lora.add_mtl_lora(model, T, targets=targets)
    assert all(type(m.base) is nn.Linear and type(m.lora_A) is nn.Linear
               for m in mtl_lora.mtl_layers(model))


def test_a_second_call_keeps_the_first_calls_adapters_trainable():
    model = Tiny()
    mtl_lora.add_mtl_lora(model, T, targets=["q"], r=4)
    mtl_lora.add_mtl_lora(model, T, targets=["up"], r=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.{t}.lora_{k}" for i in range(2) for t in ("q", "up")
                         for k in ("A.weight", "lambda", "B", "w")}


def test_merge_refuses_a_bad_task_id():
    layer = mtl_lora.MTLLoRALinear(nn.Linear(8, 6), n_tasks=T, r=2, diagonal=True)
    for bad in (T, -1, 1.0, True):
        with pytest.raises(ValueError, match="merge needs one task id"):
            layer.merge(bad)


def test_a_merged_model_refuses_other_tasks():
    model = adapted()
    for t in range(T):
        mtl_lora.merge_mtl_lora(model, t)
        other = (t + 1) % T
        with pytest.raises(ValueError, match="unmerge"):
            mtl_lora.merge_mtl_lora(model, other)
        with pytest.raises(RuntimeError, match="merged for one task"):    # refused at entry
            with mtl_lora.task_ids(model, torch.tensor([t, other])):
                pass
        mtl_lora.unmerge_mtl_lora(model)


# ----------------------------------------------------------------------------- task ids

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


def test_task_ids_and_forward_read_no_tensor_value_on_the_host(monkeypatch):
    """No .item()/.tolist()/bool()/int()/float()/index of a tensor per step (by the repository's
    code or torch's): no host sync on a GPU."""
    model = adapted()
    randomize(model)
    reads = count_host_reads(monkeypatch, anywhere=True)      # torch's reads count too
    x = torch.randn(4, 3, 12)
    with mtl_lora.task_ids(model, torch.tensor([0, 2, 1, 0])):
        model(x).sum().backward()
    mtl_lora.merge_mtl_lora(model, 1)
    with mtl_lora.task_ids(model, torch.tensor([1, 1, 1, 1])):
        model(x)
    assert reads == []


# ----------------------------------------------------------------------------- state dicts, merging

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
        no_w = {k: v for k, v in state.items() if "lora_w" not in k}
        mtl_lora.load_mtl_state_dict(adapted(), no_w)
    with pytest.raises(ValueError, match="load into a model adapted"):
        mtl_lora.load_mtl_state_dict(Tiny(), state)
    merged = adapted()
    mtl_lora.merge_mtl_lora(merged, 0)
    with pytest.raises(ValueError, match="unmerge_mtl_lora"):
        mtl_lora.load_mtl_state_dict(merged, state)


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
    torch.testing.assert_close(fresh.blocks[0]["q"].base.weight,
                               adapted().blocks[0]["q"].base.weight, atol=1e-6, rtol=0)
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


# ----------------------------------------------------------------------------- dtypes and devices

def test_a_quantized_base_gets_fp32_adapters_and_merging_is_refused_before_any_change():
    """An nn.Linear with an integer weight (bitsandbytes' 4/8-bit: tests/test_quantized.py): fp32
    adapters, the start is the base; merging would write a float update into the integer weight:
    refused before any layer changes (the float q and up come before the quantized down)."""
    torch.manual_seed(0)
    model, x, ids = quantized_tiny(["down"]), torch.randn(2, 3, 12), torch.tensor([0, 1])
    want = model(x)
    mtl_lora.add_mtl_lora(model, T, ["q", "up", "down"], r=4)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    with mtl_lora.task_ids(model, ids):
        assert torch.equal(model(x), want)
        randomize(model)
        adapted_out, weights = model(x), [p.clone() for p in model.parameters()]
    for merge in (lambda: mtl_lora.merge_mtl_lora(model, 1),
                  lambda: mtl_lora.merge_and_unload_mtl_lora(model, 1),
                  lambda: model.blocks[0]["down"].merge(1)):
        with pytest.raises(ValueError, match=r"cannot merge into a quantized weight \(Int8Linear, "
                           r"torch.int8\): dequantize .* then merge_and_unload_mtl_lora"):
            merge()
    assert not any(m.merged for m in mtl_lora.mtl_layers(model))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))
    with mtl_lora.task_ids(model, ids):
        assert torch.equal(model(x), adapted_out)


def test_output_dtype_under_autocast():
    model = adapted(dropout=0.5)
    randomize(model)
    with mtl_lora.task_ids(model, torch.tensor([1, 2])):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(torch.randn(2, 3, 12)).dtype == torch.bfloat16


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


# ----------------------------------------------------------------------------- data parallelism

@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_a_model_wrapped_for_data_parallelism_is_refused_naming_the_order(engine):
    """Wrapped first, each process would train an adapter of its own: adapt, then wrap."""
    with wrapped_for(engine, Tiny()) as model:
        with pytest.raises(ValueError, match="adapt the plain model first, then wrap it"):
            mtl_lora.add_mtl_lora(model, T, targets=["q"])
        assert not mtl_lora.mtl_layers(model)
