"""lora.py's guards: bad input raising ValueError, and the engineering (state dicts, merging
bookkeeping, bf16, autocast, building on meta). What LoRA computes: tests/test_lora.py."""
import contextlib
import math
import os

import pytest
import torch
import torch.nn as nn

import lora
from helpers import ROOT, Tiny, quantized_tiny
from test_lora import adapted, randomize_B


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw, msg", [(dict(targets=["nope"]), "match no layer"),
                                     (dict(targets=[]), "targets must be"),
                                     (dict(alpha=float("inf")), "alpha"),
                                     (dict(alpha=float("nan")), "alpha"),
                                     (dict(dropout=float("nan")), "dropout"),
                                     (dict(r=0), "rank"), (dict(r=2.5), "rank"),
                                     (dict(alpha=0), "alpha"), (dict(dropout=1.0), "dropout"),
                                     (dict(targets=["blocks"]), "not an nn.Linear"),
                                     (dict(fp32_adapter="False"), "fp32_adapter must be True"),
                                     (dict(fp32_adapter=0), "fp32_adapter must be True")])
def test_bad_inputs_raise(kw, msg):
    args = dict(targets=["q"], r=4) | kw
    with pytest.raises(ValueError, match=msg):
        lora.add_lora(Tiny(), **args)


def test_a_failed_call_changes_nothing():
    model = Tiny()
    with pytest.raises(ValueError):
        lora.add_lora(model, targets=["q", "nope"])
    with pytest.raises(ValueError):
        lora.add_lora(model, targets=["q"], r=0)
    with pytest.raises(ValueError):
        lora.add_lora(model, targets=["q"], fp32_adapter="yes")
    assert not lora.lora_layers(model) and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("module", [nn.Conv1d(4, 4, 1), nn.Embedding(5, 4)])
def test_layer_wraps_only_linear(module):
    with pytest.raises(ValueError, match="wraps an nn.Linear"):
        lora.LoRALinear(module)


def test_conv1d_style_layers_are_refused():
    class Conv1D(nn.Module):                               # HF GPT-2's layer: weight (d_in, d_out)
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(12, 12))

        def forward(self, x):
            return x @ self.weight
    model = nn.Sequential(Conv1D())
    with pytest.raises(ValueError, match="not an nn.Linear"):
        lora.add_lora(model, targets=["0"])


def test_adapting_twice_and_multihead_attention_raise():
    model = adapted()
    with pytest.raises(ValueError, match="adapt each layer once"):
        lora.add_lora(model, targets=["q"])
    enc = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    with pytest.raises(ValueError, match="MultiheadAttention"):
        lora.add_lora(enc, targets=["out_proj"])


@pytest.mark.parametrize("target", ["base", "lora_A", "lora_B"])
def test_layers_inside_an_adapter_are_refused(target):
    model = adapted()
    with pytest.raises(ValueError, match="adapt each layer once"):
        lora.add_lora(model, targets=[target])
    assert not any(isinstance(m.base, lora.LoRALinear) for m in lora.lora_layers(model))


def test_adding_more_adapters_keeps_the_first_ones_trainable():
    torch.manual_seed(0)
    model = Tiny()
    lora.add_lora(model, targets=["q"], r=2)
    lora.add_lora(model, targets=["down"], r=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.{t}.lora_{ab}.weight" for i in range(2) for t in ("q", "down")
                         for ab in "AB"}


def test_the_plumbing_is_the_same_in_the_three_adapter_files():
    """The block under the banner "Plumbing, the same in lora.py, multihead_lora.py and
    mtl_lora.py", up to the "Our choices" comments, is the same text in the three files, so a fix
    to one reaches all three."""
    def plumbing(name):
        text = open(os.path.join(ROOT, name)).read()
        start = text.index("# Plumbing, the same in lora.py, multihead_lora.py and mtl_lora.py")
        return text[start:text.index("\n# Our choices", start)]
    blocks = [plumbing(name) for name in ("lora.py", "multihead_lora.py", "mtl_lora.py")]
    assert "def _adapt(" in blocks[0] and blocks[0].count("\ndef ") >= 10
    assert blocks[1] == blocks[0] and blocks[2] == blocks[0]


# ----------------------------------------------------------------------------- quantized layers

def test_a_quantized_base_gets_fp32_adapters_and_merging_is_refused_before_any_change():
    """An nn.Linear with an integer weight (bitsandbytes' 4/8-bit: tests/test_quantized.py): fp32
    adapters (its compute dtype with fp32_adapter=False), the start is the base; merging would
    write a float update into the integer weight, so it is refused before any layer changes (the
    float q and up come before the quantized down)."""
    torch.manual_seed(0)
    model, x = quantized_tiny(["down"]), torch.randn(2, 3, 12)
    want = model(x)
    lora.add_lora(model, ["q", "up", "down"], r=4)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert torch.equal(model(x), want)
    randomize_B(model)
    adapted_out, weights = model(x), [p.clone() for p in model.parameters()]
    for merge in (lambda: lora.merge_lora(model), lambda: lora.merge_and_unload_lora(model),
                  lora.lora_layers(model)[-1].merge):
        with pytest.raises(ValueError, match=r"cannot merge into a quantized weight \(Int8Linear, "
                           r"torch.int8\): dequantize .* then merge_and_unload_lora\(model\)"):
            merge()
    assert not any(m.merged for m in lora.lora_layers(model)) and len(lora.lora_layers(model)) == 6
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))
    assert torch.equal(model(x), adapted_out)
    down = model.blocks[0]["down"].base
    down.compute_dtype = torch.bfloat16                     # as bitsandbytes' 4-bit layer has
    for fp32, dtype in [(True, torch.float32), (False, torch.bfloat16)]:
        layer = lora.LoRALinear(down, r=2, fp32_adapter=fp32)
        assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == dtype


# ----------------------------------------------------------------------------- state dicts

def test_state_dict_round_trip(tmp_path):
    model = adapted(seed=0)
    randomize_B(model)
    state = lora.lora_state_dict(model)
    assert state and all(".lora_" in k for k in state)
    torch.save(state, tmp_path / "a.pt")
    fresh = adapted(seed=0)                       # same base weights, fresh adapters
    for m in lora.lora_layers(fresh):
        m.lora_A.weight.data.normal_()
    lora.load_lora_state_dict(fresh, torch.load(tmp_path / "a.pt"))
    x = torch.randn(2, 4, 12)
    assert torch.equal(fresh(x), model(x))


def test_load_rejects_mismatch():
    state = lora.lora_state_dict(adapted(r=4))
    with pytest.raises(ValueError, match="rank"):
        lora.load_lora_state_dict(adapted(r=2), state)
    other = Tiny()
    lora.add_lora(other, targets=["q"], r=4)
    with pytest.raises(ValueError, match="do not fit"):
        lora.load_lora_state_dict(other, state)
    with pytest.raises(ValueError, match="add_lora"):
        lora.load_lora_state_dict(Tiny(), state)


def test_merged_state_dict_loads_exactly_into_a_fresh_copy():
    model = adapted()
    randomize_B(model)
    x = torch.randn(2, 3, 12)
    want = model(x)
    lora.merge_lora(model)
    fresh = adapted()                                      # same base, unmerged, fresh adapters
    fresh.load_state_dict(model.state_dict())
    assert all(m.merged for m in lora.lora_layers(fresh))
    torch.testing.assert_close(fresh(x), want, atol=1e-5, rtol=1e-5)
    lora.unmerge_lora(fresh)
    torch.testing.assert_close(fresh(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fresh.blocks[0]["q"].base.weight,
                               adapted().blocks[0]["q"].base.weight, atol=1e-6, rtol=0)


def test_unmerge_restores_W0_even_if_the_adapter_changed_while_merged():
    model = adapted()
    randomize_B(model)
    w0 = model.blocks[0]["q"].base.weight.clone()
    lora.merge_lora(model)
    randomize_B(model, seed=9)                             # e.g. a checkpoint loaded meanwhile
    lora.unmerge_lora(model)
    torch.testing.assert_close(model.blocks[0]["q"].base.weight, w0, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- dtypes and devices

def test_output_dtype_under_autocast():
    model = adapted(dropout=0.5)
    randomize_B(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(2, 3, 12)).dtype == torch.bfloat16


def test_merge_bf16_base_stays_close():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(32, 16).to(torch.bfloat16), r=4).float()
    layer.base.to(torch.bfloat16)
    layer.lora_B.weight.data.normal_(std=0.1)
    x = torch.randn(8, 32)
    unmerged = layer(x.to(torch.bfloat16)).float()
    layer.merge()
    merged = layer(x.to(torch.bfloat16)).float()
    assert merged.dtype == torch.float32 and (merged - unmerged).abs().max() < 0.1


def test_bf16_merge_unmerge_restores_W0_to_bf16_rounding():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(64, 32).to(torch.bfloat16), r=4).float()
    layer.lora_B.weight.data.normal_(std=0.1)
    w0 = layer.base.weight.clone().float()
    layer.merge()
    layer.unmerge()
    err = (layer.base.weight.float() - w0).abs()
    ulp = (w0.abs() + layer.delta_weight().abs()) * 2.0 ** -8   # one bf16 rounding of W0 + s B A
    assert err.max() > 0 and (err <= ulp + 1e-12).all()         # not bit for bit, but within one


def test_reset_parameters_after_building_on_meta():
    with torch.device("meta"):
        model = Tiny()
        lora.add_lora(model, targets=["q", "up"], r=4)
    model.to_empty(device="cpu")
    model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    x = torch.randn(2, 3, 12)
    for m in lora.lora_layers(model):
        assert torch.count_nonzero(m.lora_B.weight) == 0
        assert m.lora_A.weight.abs().max() <= 1 / math.sqrt(m.base.in_features)
        torch.testing.assert_close(m(x if m.base.in_features == 12 else x.repeat(1, 1, 3)),
                                   m.base(x if m.base.in_features == 12 else x.repeat(1, 1, 3)))


# ----------------------------------------------------------------------------- data parallelism

@contextlib.contextmanager
def wrapped_for(engine, model):
    """`model` wrapped as each process of torchrun wraps it (here a group of one, gloo, CPU): in
    DDP, or fully_shard (FSDP2); skipped where this torch has neither."""
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("this torch has no torch.distributed")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        if engine == "ddp":
            yield nn.parallel.DistributedDataParallel(model)
        else:
            fully_shard = getattr(pytest.importorskip("torch.distributed.fsdp"), "fully_shard", None)
            if fully_shard is None:
                pytest.skip("this torch has no fully_shard")
            fully_shard(model, mesh=dist.device_mesh.init_device_mesh("cpu", (1,)))
            yield model
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_a_model_wrapped_for_data_parallelism_is_refused_naming_the_order(engine):
    """Wrapped first, each process would train an adapter of its own (DDP and fully_shard know
    only the parameters there were when they wrapped): adapt the plain model, then wrap it."""
    with wrapped_for(engine, Tiny()) as model:
        with pytest.raises(ValueError, match="adapt the plain model first, then wrap it"):
            lora.add_lora(model, targets=["q"])
        assert not lora.lora_layers(model)
