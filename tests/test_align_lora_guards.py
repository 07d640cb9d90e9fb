"""align_lora.py's guards: bad input raising ValueError, and the engineering (hooks removed,
captures cleared, no host read in a call, output layouts, bf16). What the loss computes:
tests/test_align_lora.py."""
import time

import pytest
import torch

import align_lora
import lora
from helpers import Tiny, count_host_reads
from test_align_lora import Probe, kl_reference, loss_of


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("ids, mask, msg", [
    (torch.tensor([0.0, 1, 0, 1]), None, "task_ids must be integers"),
    ("0101", None, "task_ids must be integers"),
    (torch.tensor([0, 1, 0]), None, "do not fit 3 task ids"),
    (torch.tensor([0, 1, 0, 1, 0, 1]), torch.ones(6, 2, dtype=torch.bool), "do not fit"),
    (torch.tensor([[0, 1, 0, 1]]), None, "shape"),
    (torch.tensor([], dtype=torch.long), None, "B >= 1"),
    (torch.tensor([0, 1, 0, 1]), torch.ones(4, 3), "bool or integer"),
    (torch.tensor([0, 1, 0, 1]), [[1.0] * 3] * 4, "bool or integer"),
    (torch.tensor([0, 1, 0, 1]), "1110", "bool or integer"),
    (torch.tensor([0, 1, 0, 1]), torch.ones(4, 2, dtype=torch.bool), "do not fit"),
    (torch.tensor([0, 1, 0, 1]), torch.ones(4, dtype=torch.bool), "do not fit")])
def test_bad_call_inputs_raise(ids, mask, msg):
    probe = Probe()
    align = align_lora.AlignmentLoss(probe, 2)
    probe(torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match=msg):
        align(ids, mask)


def test_bad_construction_and_outputs_raise():
    with pytest.raises(ValueError, match="add adapters first"):
        align_lora.AlignmentLoss(Tiny(), 2)
    for kw, msg in [(dict(kind="cos"), "kind"), (dict(eps=0), "eps"), (dict(max_tokens=1), "max_"),
                    (dict(bandwidths=[1.0, -1.0]), "bandwidths"), (dict(eps=float("nan")), "eps"),
                    (dict(bandwidths=[float("inf")]), "bandwidths"), (dict(bandwidths=[]), "bandw"),
                    (dict(n_tasks=1), "n_tasks"), (dict(n_tasks=2.0), "n_tasks"),
                    (dict(n_tasks="2"), "n_tasks")]:
        with pytest.raises(ValueError, match=msg):
            align_lora.AlignmentLoss(Probe(), **{"n_tasks": 2, **kw})
    for zs, msg in [([torch.randn(4, 3, 2), torch.randn(4, 5, 2)], "one L for all"),   # L differs
                    ([torch.randn(4)], "do not fit"),
                    ([torch.randn(12, 2)], "with a mask"),               # flat tokens, no mask
                    ([(torch.randn(4, 3, 2),)], r"\[\(\)\] do not fit")]:      # not a tensor
        probe = Probe(len(zs))
        align = align_lora.AlignmentLoss(probe, 2)
        probe(*zs)
        with pytest.raises(ValueError, match=msg):
            align(torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("kind", align_lora.KINDS)
@pytest.mark.parametrize("ids", [[0, 1_000_000], [0, 2], [0, -1], [-(2 ** 40), 1]])
def test_out_of_range_ids_raise_at_once_without_allocating(kind, ids):
    """The statistics are sized by n_tasks: a huge id is refused by the device-side assert
    before anything is sized by it (the old code built a one-hot over the largest id)."""
    probe = Probe()
    align = align_lora.AlignmentLoss(probe, n_tasks=2, kind=kind)
    probe(torch.randn(2, 3, 4))
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"task ids must be in \[0, n_tasks=2\)"):
        align(torch.tensor(ids))
    assert time.perf_counter() - t0 < 0.5


# ----------------------------------------------------------------------------- hooks and captures

def test_remove_and_context_manager_leave_no_hooks():
    def hooks(m):
        return sum(len(x._forward_hooks) for x in m.modules())
    model = Tiny()
    lora.add_lora(model, targets=["q", "down"], r=2)
    align = align_lora.AlignmentLoss(model, 2)
    assert hooks(model) == 4
    align.remove()
    align.remove()                                              # idempotent
    model(torch.randn(2, 3, 12))
    assert hooks(model) == 0 and not align._z
    with pytest.raises(ValueError, match="build a new AlignmentLoss"):
        align(torch.tensor([0, 1]))
    with align_lora.AlignmentLoss(model, 2) as align:
        model(torch.randn(2, 3, 12))
        assert hooks(model) == 4 and len(align._z) == 4
    assert hooks(model) == 0 and not align._z
    model(torch.randn(2, 3, 12))
    assert not align._z


def test_captures_are_kept_until_the_call_and_cleared_by_it():
    torch.manual_seed(0)
    model = Tiny()
    lora.add_lora(model, targets=["q", "up", "down"], r=4, dropout=0.1)
    align = align_lora.AlignmentLoss(model, 3)
    model(torch.randn(6, 5, 12))
    assert len(align._z) == 6
    align(torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    assert not align._z                                         # cleared: no graph kept
    with pytest.raises(ValueError, match="forward pass first"):
        align(torch.tensor([0, 1, 2, 0, 1, 2]))


@pytest.mark.parametrize("kind", align_lora.KINDS)
def test_no_host_read_in_a_loss_call(kind, monkeypatch):
    """No .item/.tolist/bool/int/float/index of a tensor during the call, by the repository's code
    or torch's (each would be a host-device sync per training step on a GPU), with padding and
    MMD's subsampling."""
    torch.manual_seed(0)
    model = Tiny()
    lora.add_lora(model, ["q", "up", "down"], r=4)
    align = align_lora.AlignmentLoss(model, 3, kind=kind, max_tokens=16)
    x, ids = torch.randn(6, 5, 12), torch.arange(6) % 3
    mask = torch.rand(6, 5) > 0.2
    model(x)
    reads = count_host_reads(monkeypatch, anywhere=True)       # the loss call alone is counted
    loss = align(ids, mask)
    assert reads == []
    loss.backward()
    monkeypatch.undo()
    assert loss.item() > 0


# ----------------------------------------------------------------------------- layouts and dtypes

def test_flattened_and_many_dim_outputs_read_as_tokens():
    torch.manual_seed(0)
    z, ids = torch.randn(6, 4, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    mask = torch.rand(6, 4) > 0.2
    ref = loss_of([z], ids, mask)
    torch.testing.assert_close(loss_of([z.reshape(24, 3)], ids, mask), ref)   # (B*L, r)
    torch.testing.assert_close(loss_of([z.reshape(6, 2, 2, 3)], ids, mask), ref)   # (B, 2, 2, r)


def test_two_dim_outputs_and_bf16_under_autocast():
    torch.manual_seed(0)
    z, ids = torch.randn(8, 4), torch.arange(8) % 2
    mask = torch.tensor([True] * 7 + [False])
    ref = kl_reference([z[:, None]], ids, mask[:, None])
    torch.testing.assert_close(loss_of([z], ids, mask), ref.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of([z.bfloat16()], ids, mask)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref.float(), rtol=0.05, atol=0.01)


# ----------------------------------------------------------------------------- what users meet

def test_masks_and_ids_may_be_lists_or_numpy_arrays():
    """As the README says: a mask or task ids given as a list or a numpy array (bool or integer)
    give the loss of the same tensors (a numpy bool mask was refused with "got bool")."""
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    z, ids = torch.randn(4, 3, 2), torch.tensor([0, 1, 0, 1])
    mask = torch.tensor([[1, 1, 0]] * 3 + [[1, 0, 0]], dtype=torch.bool)
    ref = loss_of([z], ids, mask)
    for m in (mask.tolist(), mask.numpy(), mask.long().numpy(), mask.int().tolist()):
        for i in (ids, ids.tolist(), ids.numpy()):
            assert torch.equal(loss_of([z], i, m), ref)
    assert np.asarray(mask).dtype == np.bool_


def test_after_merge_or_unload_the_error_says_why_nothing_was_captured():
    """Merged adapters skip lora_A, unloaded ones are gone: the error says so (it used to say
    "run the forward first", which the user had done)."""
    model, x, ids = Tiny(), torch.randn(2, 3, 12), torch.tensor([0, 1])
    lora.add_lora(model, targets=["q", "down"], r=2)
    align = align_lora.AlignmentLoss(model, 2)
    lora.merge_lora(model)
    model.eval()(x)
    with pytest.raises(ValueError, match=r"merged.*unmerge_\*\(model\)"):
        align(ids)
    model = lora.merge_and_unload_lora(model)
    model(x)
    with pytest.raises(ValueError, match="adapters are gone from the model"):
        align(ids)


def test_a_model_with_an_alignment_loss_pickles_and_copies(tmp_path):
    """torch.save(model) with the hooks attached works (it raised "Can't pickle local object");
    the loaded model computes the same and its hooks do nothing. A deepcopy's forward does not
    overwrite the original's captures."""
    import copy
    torch.manual_seed(0)
    model, x, ids = Tiny(), torch.randn(4, 3, 12), torch.tensor([0, 1, 0, 1])
    lora.add_lora(model, targets=["q", "down"], r=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    align = align_lora.AlignmentLoss(model, 2)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    want = model(x)
    ref = align(ids)
    assert torch.equal(loaded(x), want) and not align._z    # its hooks capture nothing
    fresh = align_lora.AlignmentLoss(loaded, 2)             # a new loss for the loaded model
    loaded(x)
    assert torch.equal(fresh(ids), ref)
    twin = copy.deepcopy(model)
    model(x)
    twin(x + 1)                                             # the copy's layers are skipped
    assert torch.equal(align(ids), ref)


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_forward_without_autograd_is_refused_while_the_adapters_train(reentrant):
    """Reentrant gradient checkpointing (peft's prepare_model_for_kbit_training's default) runs the
    forward without autograd: the captured lora_A outputs carry no gradient and the alignment
    would silently not train. Refused with the way out; use_reentrant=False works."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    model, x, ids = Tiny(), torch.randn(4, 3, 12, requires_grad=True), torch.tensor([0, 1, 0, 1])
    lora.add_lora(model, targets=["q", "down"], r=2)
    align = align_lora.AlignmentLoss(model, 2)
    checkpoint(model, x, use_reentrant=reentrant)
    if reentrant:
        with pytest.raises(ValueError, match="use_reentrant=False"):
            align(ids)
    else:
        align(ids).backward()
        assert all(m.lora_A.weight.grad.abs().sum() > 0 for m in lora.lora_layers(model))
    with torch.no_grad():                                   # evaluating: no gradient wanted
        model(x)
        assert align(ids) > 0
