"""The method files as users use them in their own projects: their docstrings' usage examples,
saving and loading whole models, merge-and-unload, half-precision bases, files combined, copies,
pickling, and the misuses users make, each answered by a clear error or a right result
(tests/test_hf.py: the same on HF models)."""
import copy
import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import align_lora
import lora
import mtl_lora
import multihead_lora as mh
import spurious_reg
from helpers import Tiny, run_docstring_example

T = 3                                                      # tasks, for MTL-LoRA
ADAPT = {   # name -> (adapt, merge-and-unload; None where the method cannot merge)
    "lora": (lambda m, **kw: lora.add_lora(m, ["q", "up"], r=4, **kw),
             lambda m: lora.merge_and_unload_lora(m)),
    "mlora": (lambda m, **kw: mh.add_multihead_lora(m, ["q", "up"], router=False, **kw),
              lambda m: mh.merge_and_unload_multihead_lora(m)),
    "mlora-offset": (lambda m, **kw: mh.add_multihead_lora(m, ["q", "up"], router=False,
                                                           init="offset", **kw),
                     lambda m: mh.merge_and_unload_multihead_lora(m)),
    "hydra": (lambda m, **kw: mh.add_multihead_lora(m, ["q", "up"], **kw), None),
    "mtl": (lambda m, **kw: mtl_lora.add_mtl_lora(m, T, ["q", "up"], r=4, **kw),
            lambda m: mtl_lora.merge_and_unload_mtl_lora(m, 1)),
}
MERGE = {"lora": lora.merge_lora, "mlora": mh.merge_multihead_lora,
         "mlora-offset": mh.merge_multihead_lora, "mtl": lambda m: mtl_lora.merge_mtl_lora(m, 1)}
IDS = torch.tensor([1, 1, 1])                              # task 1: what the MTL merge serves


def adapted(method, seed=0, **kw):
    torch.manual_seed(seed)
    model = Tiny()
    ADAPT[method][0](model, **kw)
    with torch.no_grad():                                  # trained-looking adapters, not zero
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def run(model, x, ids=IDS):
    if mtl_lora.mtl_layers(model):
        with mtl_lora.task_ids(model, ids):
            return model(x)
    return model(x)


# ----------------------------------------------------------------------------- docstring examples

@pytest.mark.parametrize("module", [lora, mh, mtl_lora, align_lora, spurious_reg],
                         ids=lambda module: module.__name__)
def test_the_docstring_usage_example_runs_as_written(module, tmp_path):
    """Each method file's usage example, copied into a project, runs and does what it says."""
    names = run_docstring_example(module, tmp_path)
    if module in (lora, mh):                               # the adapter tensors, saved
        assert (tmp_path / "adapter.pt").exists()
    if module is lora:                                     # merged and unloaded: plain layers
        assert names["names"] == ["0", "2"]
        assert [type(m) for m in names["model"]] == [nn.Linear, nn.GELU, nn.Linear]
    if module is mh:
        assert names["w"]["0"].shape == (8, 5, 3)
    if module is mtl_lora:
        assert names["out"].shape == (4, 4)
    if module is align_lora:                               # L_align's gradient reached every A
        assert all(m.lora_A.weight.grad.abs().sum() > 0 for m in lora.lora_layers(names["model"]))
    if module is spurious_reg:
        assert names["crl"].G.grad is not None and names["crl"].G.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- saving and loading

@pytest.mark.parametrize("method", MERGE)
@pytest.mark.parametrize("merged", [False, True])
def test_a_whole_state_dict_is_plain_tensors_and_reloads_exactly(method, merged):
    """What HF save_pretrained and Trainer checkpoints need: every value a tensor, merged or not;
    through a weights-only torch.load (tensors only) into a fresh model adapted alike."""
    model, x = adapted(method), torch.randn(3, 5, 12)
    want = run(model, x)
    if merged:
        MERGE[method](model)
    state = model.state_dict()
    assert all(torch.is_tensor(v) for v in state.values())
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    fresh = adapted(method, seed=1)                        # other adapters, unmerged
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(run(fresh, x), want, atol=1e-5, rtol=1e-5)
    assert all(m.merged == merged for m in fresh.modules() if hasattr(m, "merged"))


@pytest.mark.parametrize("method", [m for m in ADAPT if ADAPT[m][1]])
def test_merge_and_unload_leaves_plain_linear_layers_with_the_same_outputs(method):
    model, x = adapted(method), torch.randn(3, 5, 12)
    want = run(model, x)
    plain = ADAPT[method][1](model)
    assert plain is model and not any(hasattr(m, "lora_A") for m in model.modules())
    assert all(type(b[n]) is nn.Linear for b in model.blocks for n in ("q", "up", "down"))
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_refuses_a_routed_model_and_changes_nothing():
    model = adapted("hydra")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="router"):
        mh.merge_and_unload_multihead_lora(model)
    assert mh.multihead_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ADAPT)
def test_adapters_on_a_half_precision_base_are_fp32_unless_asked(method):
    for dtype in (torch.bfloat16, torch.float16):
        model = Tiny().to(dtype)
        ADAPT[method][0](model)
        kept = Tiny().to(dtype)
        ADAPT[method][0](kept, fp32_adapter=False)
        for m, want in [(model, torch.float32), (kept, dtype)]:
            adapter = [p for p in m.parameters() if p.requires_grad]
            assert adapter and all(p.dtype == want for p in adapter)
            assert all(p.dtype == dtype for n, p in m.named_parameters() if ".base." in n)
        x = torch.randn(3, 5, 12, dtype=dtype)
        assert run(model, x).dtype == dtype and run(model, x).isfinite().all()


def test_fp32_adapter_keeps_an_update_that_bf16_rounds_away():
    layer = lora.LoRALinear(nn.Linear(8, 8).to(torch.bfloat16), r=2)
    half = lora.LoRALinear(nn.Linear(8, 8).to(torch.bfloat16), r=2, fp32_adapter=False)
    for m in (layer, half):
        with torch.no_grad():
            m.lora_A.weight.fill_(1.0)
            m.lora_A.weight.add_(1e-3)                     # below bf16's resolution at 1.0
    assert layer.lora_A.weight[0, 0] != 1.0 and half.lora_A.weight[0, 0] == 1.0


# ----------------------------------------------------------------------------- files combined

def test_files_combine_without_freezing_each_others_adapters():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    lora.add_lora(model, ["0"], r=2)
    mh.add_multihead_lora(model, ["1"], r=2)
    mtl_lora.add_mtl_lora(model, 2, ["2"], r=2)
    lora.add_lora(model, ["3"], r=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A.weight", "0.lora_B.weight", "1.lora_A.weight", "1.lora_B",
                         "1.router.weight", "2.lora_A.weight", "2.lora_lambda", "2.lora_B",
                         "2.lora_w", "3.lora_A.weight", "3.lora_B.weight"}
    align = align_lora.AlignmentLoss(model, 2)             # one lora_A per layer, any file
    with mtl_lora.task_ids(model, torch.tensor([0, 1, 0, 1])):
        model(torch.randn(4, 3, 4))
    assert align(torch.tensor([0, 1, 0, 1])).isfinite()


def test_a_layer_reachable_under_two_names_is_adapted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(6, 6)
            self.dec = self.enc                            # tied: one layer, two names

        def forward(self, x):
            return self.dec(torch.relu(self.enc(x)))
    model = Tied()
    assert lora.add_lora(model, ["dec"], r=2) == ["dec"]
    assert model.enc is model.dec and isinstance(model.enc, lora.LoRALinear)
    assert len(lora.lora_layers(model)) == 1
    x = torch.randn(2, 6)
    lora.lora_layers(model)[0].lora_B.weight.data.normal_()
    want = model(x)
    lora.merge_and_unload_lora(model)
    assert model.enc is model.dec and type(model.enc) is nn.Linear
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- copies and pickling

def test_a_deep_copy_does_not_write_into_the_originals_alignment_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    lora.add_lora(model, ["0"], r=2)
    align = align_lora.AlignmentLoss(model, 2)
    ema = copy.deepcopy(model)                             # e.g. an EMA of the weights
    x, ids = torch.randn(4, 3, 4), torch.tensor([0, 1, 0, 1])
    model(x)
    want = align(ids)
    model(x)
    ema(2 * x)                                             # the copy's pass must not replace ours
    got = align(ids)
    assert torch.equal(got, want)
    got.backward()
    assert model[0].lora_A.weight.grad is not None and ema[0].lora_A.weight.grad is None


@pytest.mark.parametrize("method", ADAPT)
def test_an_adapted_stock_encoder_pickles_whole(method):
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(12, 2, 24, dropout=0.0,
                                                           batch_first=True), 2)
    adapt = {"lora": lambda m: lora.add_lora(m, ["linear1"], r=2),
             "mlora": lambda m: mh.add_multihead_lora(m, ["linear1"], router=False),
             "mlora-offset": lambda m: mh.add_multihead_lora(m, ["linear1"], router=False,
                                                             init="offset"),
             "hydra": lambda m: mh.add_multihead_lora(m, ["linear1"]),
             "mtl": lambda m: mtl_lora.add_mtl_lora(m, T, ["linear1"], r=2)}[method]
    adapt(enc)
    enc.eval()
    buf = io.BytesIO()
    torch.save(enc, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(run(back, x), run(enc, x))


# ----------------------------------------------------------------------------- misuses

@pytest.mark.parametrize("method", MERGE)
def test_training_a_merged_model_warns_that_the_adapter_gets_no_gradient(method):
    model = adapted(method).train()
    MERGE[method](model)
    with pytest.warns(UserWarning, match="merged .* no gradient"):
        run(model, torch.randn(3, 5, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # serving: no warning
        run(model.eval(), torch.randn(3, 5, 12))
        with torch.no_grad():
            run(model.train(), torch.randn(3, 5, 12))


ADD = {"lora": lambda m, t, **kw: lora.add_lora(m, t, **kw),
       "multihead": lambda m, t, **kw: mh.add_multihead_lora(m, t, **kw),
       "mtl": lambda m, t, **kw: mtl_lora.add_mtl_lora(m, T, t, **kw)}


@pytest.mark.parametrize("add", ADD)
@pytest.mark.parametrize("model, targets, kw, msg", [
    (Tiny(), ["q"], dict(r=True), "rank r"), (Tiny(), ["q"], dict(alpha="16"), "alpha"),
    (Tiny(), ["q"], dict(dropout=None), "dropout"), (Tiny(), None, {}, "targets must be"),
    (Tiny(), 0, {}, "targets must be"), (Tiny(), [""], {}, "targets must be"),
    (None, ["q"], {}, "must be an nn.Module")])
def test_arguments_of_the_wrong_type_are_named_in_a_value_error(add, model, targets, kw, msg):
    with pytest.raises(ValueError, match=msg):
        ADD[add](model, targets, **kw)


def test_numpy_numbers_are_accepted_where_python_ones_are():
    model = Tiny()
    mtl_lora.add_mtl_lora(model, np.int64(T), ["q"], r=np.int64(4), alpha=np.float32(8.0))
    mtl_lora.merge_mtl_lora(model, np.int64(1))
    assert all(m.merged_task == 1 for m in mtl_lora.mtl_layers(model))
    with pytest.raises(ValueError, match="merged for task 1: unmerge_mtl_lora"):
        mtl_lora.merge_mtl_lora(model, 2)
    with pytest.raises(ValueError, match=r"an int in \[0, 3\), got 1.5$"):
        mtl_lora.merge_mtl_lora(model, 1.5)
    assert align_lora.AlignmentLoss(model, np.int64(T)).n_tasks == T
    assert spurious_reg.MTCRL(np.int64(8), np.int32(2), np.int64(4)).G.shape == (2, 4)
    hydra = Tiny()
    mh.add_multihead_lora(hydra, ["q"])
    with mh.record_routing(hydra) as w:
        hydra(torch.randn(3, 5, 12))
    assert mh.routing_table(w, torch.tensor([0, 1, 1], dtype=torch.int16), np.int64(2)).shape == (2, 3)


def test_alignment_loss_takes_an_integer_mask_and_a_list_of_ids():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    lora.add_lora(model, ["0"], r=2)
    align = align_lora.AlignmentLoss(model, 2)
    x = torch.randn(4, 6, 4)
    mask = torch.ones(4, 6, dtype=torch.long)               # HF's attention_mask: int64 0/1
    mask[:, 4:] = 0
    x[:, 4:] = 1e6                                          # padding that would dominate
    losses = []
    for ids, m in [(torch.tensor([0, 1, 0, 1]), mask.bool()), ([0, 1, 0, 1], mask),
                   (np.array([0, 1, 0, 1]), mask.int())]:
        model(x)
        losses.append(align(ids, m))
    assert losses[0] < 1e3 and losses[0] == losses[1] == losses[2]
