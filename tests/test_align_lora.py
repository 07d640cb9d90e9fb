import itertools
import os
import sys
import textwrap
import time

import pytest
import torch
import torch.nn as nn

import align_lora
import lora
from tiny import Tiny


class Probe(nn.Module):
    """Layers whose `lora_A` is an identity: the captured z is exactly what the test feeds in."""

    def __init__(self, n_layers=1):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict(dict(lora_A=nn.Identity()))
                                    for _ in range(n_layers))

    def forward(self, *zs):
        return [layer["lora_A"](z) for layer, z in zip(self.layers, zs)]


def loss_of(zs, ids, mask=None, n_tasks=4, **kw):
    probe = Probe(len(zs))
    with align_lora.AlignmentLoss(probe, n_tasks, **kw) as align:
        probe(*zs)
        return align(ids, mask)


def sym_kl(m_i, v_i, m_j, v_j):
    return 0.25 * (v_i / v_j + v_j / v_i + (m_i - m_j) ** 2 * (1 / v_i + 1 / v_j) - 2)


def kl_reference(zs, ids, mask, eps=1e-8):
    """Per layer: loop over tasks and pairs, statistics of the pooled real tokens (float64)."""
    per_layer = []
    for z in zs:
        stats = {}
        for t in sorted(set(ids.tolist())):
            toks = torch.cat([z[b][mask[b]] for b in range(len(ids)) if ids[b] == t]).double()
            if len(toks) >= 2:
                stats[t] = (toks.mean(0), toks.var(0, unbiased=True) + eps)
        vals = [sym_kl(*stats[i], *stats[j]).sum() for i, j in itertools.combinations(stats, 2)]
        per_layer.append(sum(vals) / len(vals) if vals else torch.tensor(0.0))
    return sum(per_layer) / len(per_layer)


def mmd_reference(zs, ids, mask, bandwidths=align_lora.BANDWIDTHS):
    per_layer = []
    for z in zs:
        bags = {}
        for t in sorted(set(ids.tolist())):
            toks = torch.cat([z[b][mask[b]] for b in range(len(ids)) if ids[b] == t]).double()
            if len(toks) >= 2:
                bags[t] = toks

        def k(x, y):
            d2 = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist") ** 2
            return sum(torch.exp(-d2 / (2 * s)) for s in bandwidths).mean()
        vals = [k(bags[i], bags[i]) + k(bags[j], bags[j]) - 2 * k(bags[i], bags[j])
                for i, j in itertools.combinations(bags, 2)]
        per_layer.append(sum(vals) / len(vals) if vals else torch.tensor(0.0))
    return sum(per_layer) / len(per_layer)


def test_kl_equals_hand_computed_closed_form():
    # task 0: tokens 1, 2, 4 (the 4th token is padding); task 1: tokens 0, 3
    z1 = torch.tensor([[1.0, 2.0], [0.0, 3.0], [4.0, 99.0]])[..., None]   # (B=3, L=2, r=1)
    ids, mask = torch.tensor([0, 1, 0]), torch.tensor([[True, True], [True, True], [True, False]])
    m0, v0 = 7 / 3, ((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2
    m1, v1 = 1.5, (1.5 ** 2 + 1.5 ** 2) / 1
    one = sym_kl(m0, v0 + 1e-8, m1, v1 + 1e-8)
    assert loss_of([z1], ids, mask).item() == pytest.approx(one, rel=1e-5)
    # a second layer with r = 2: dims 1, 2 of task 0 are (1,1),(2,0),(4,2); of task 1 (0,1),(3,-1)
    z2 = torch.tensor([[[1.0, 1], [2, 0]], [[0, 1], [3, -1]], [[4, 2], [7, 7]]])   # (3, 2, 2)
    mb0, vb0 = 1.0, 1.0
    mb1, vb1 = 0.0, 2.0
    two = one + sym_kl(mb0, vb0 + 1e-8, mb1, vb1 + 1e-8)        # sum over d
    assert loss_of([z1, z2], ids, mask).item() == pytest.approx((one + two) / 2, rel=1e-5)


@pytest.mark.parametrize("kind", ["kl", "mmd"])
def test_vectorized_equals_loop_reference(kind):
    torch.manual_seed(0)
    zs = [torch.randn(7, 5, 3) * 2 + 1, torch.randn(7, 5, 2)]
    ids = torch.tensor([2, 0, 1, 2, 0, 3, 1])
    mask = torch.rand(7, 5) > 0.3
    mask[:, 0] = True
    mask[5] = torch.tensor([True, False, False, False, False])   # task 3 has one real token: absent
    ref = (kl_reference if kind == "kl" else mmd_reference)(zs, ids, mask)
    torch.testing.assert_close(loss_of(zs, ids, mask, kind=kind), ref.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["kl", "mmd"])
def test_zero_for_identical_tasks_symmetric_and_nonnegative(kind):
    torch.manual_seed(0)
    z = torch.randn(3, 4, 5)
    same = torch.cat([z, z.flip(1)])                            # task 1: the same tokens, reordered
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    assert loss_of([same], ids, kind=kind).abs().item() < 1e-5
    zs, ids = [torch.randn(8, 4, 5), torch.randn(8, 4, 5) * 3], torch.tensor([0, 1, 2] * 2 + [1, 0])
    loss = loss_of(zs, ids, kind=kind)
    swapped = torch.tensor([1, 0, 2, 3])[ids]                   # relabel tasks 0 <-> 1
    torch.testing.assert_close(loss_of(zs, swapped, kind=kind), loss)
    assert loss.item() > 1e-3
    for seed in range(5):
        torch.manual_seed(seed)
        zs = [torch.randn(6, 3, 4) * torch.rand(4) * 3]
        assert loss_of(zs, torch.randint(0, 3, (6,)), kind=kind).item() >= -1e-6


@pytest.mark.parametrize("kind", ["kl", "mmd"])
def test_three_tasks_mean_over_pairs(kind):
    torch.manual_seed(1)
    z = torch.randn(9, 4, 3) + torch.arange(9)[:, None, None] % 3
    ids = torch.arange(9) % 3
    pair = [loss_of([z[(ids == i) | (ids == j)]], ids[(ids == i) | (ids == j)], kind=kind)
            for i, j in [(0, 1), (0, 2), (1, 2)]]
    torch.testing.assert_close(loss_of([z], ids, kind=kind), sum(pair) / 3)


@pytest.mark.parametrize("kind", ["kl", "mmd"])
def test_padding_is_ignored_even_when_huge(kind):
    torch.manual_seed(0)
    z, ids = torch.randn(6, 5, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[:, 3:] = False
    ref = loss_of([z[:, :3]], ids, kind=kind)                   # the real tokens alone
    for junk in (1e30, float("inf"), float("nan")):
        padded = z.clone()
        padded[:, 3:] = junk
        torch.testing.assert_close(loss_of([padded], ids, mask, kind=kind), ref)


def test_mmd_subsample_is_bounded_deterministic_and_skips_padding():
    torch.manual_seed(0)
    z, ids = torch.randn(10, 20, 3), torch.arange(10) % 2
    mask = torch.ones(10, 20, dtype=torch.bool)
    mask[:, 15:] = False
    z[:, 15:] = float("inf")                                    # padding never drawn: no nan
    losses = []
    for _ in range(2):
        torch.manual_seed(3)
        losses.append(loss_of([z], ids, mask, kind="mmd", max_tokens=64))
    assert torch.isfinite(losses[0]) and torch.equal(losses[0], losses[1])
    full = loss_of([z], ids, mask, kind="mmd")                 # 150 real tokens < 512: no sampling
    assert torch.isfinite(full) and not torch.equal(losses[0], full)


@pytest.mark.parametrize("kind", ["kl", "mmd"])
def test_fewer_than_two_tasks_gives_zero(kind):
    z = torch.randn(4, 3, 2, requires_grad=True)
    for ids, mask in [(torch.zeros(4, dtype=torch.long), None),
                      (torch.tensor([0, 0, 0, 1]),                     # task 1: one real token
                       torch.tensor([[True] * 3] * 3 + [[True, False, False]]))]:
        loss = loss_of([z], ids, mask, kind=kind)
        assert loss.dtype == torch.float32 and loss.shape == () and loss.item() == 0.0
        loss.backward()                                         # attached, zero gradient
        assert torch.count_nonzero(z.grad) == 0


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


def test_gradients_reach_only_lora_A_and_captures_are_cleared():
    torch.manual_seed(0)
    model = Tiny()
    lora.add_lora(model, targets=["q", "up", "down"], r=4, dropout=0.1)
    align = align_lora.AlignmentLoss(model, 3)
    assert align.names == [f"blocks.{i}.{t}.lora_A" for i in range(2) for t in ["q", "up", "down"]]
    model(torch.randn(6, 5, 12))
    assert len(align._z) == 6
    align(torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    assert not align._z                                         # cleared: no graph kept
    for n, p in model.named_parameters():
        if ".lora_A." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        elif ".lora_" not in n:
            assert p.grad is None, n                           # the base: frozen
    # B moves only through later layers' inputs: the last adapted layer's B gets nothing
    assert model.blocks[1]["down"].lora_B.weight.grad is None
    with pytest.raises(ValueError, match="forward pass first"):
        align(torch.tensor([0, 1, 2, 0, 1, 2]))


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


@pytest.mark.parametrize("ids, mask, msg", [
    (torch.tensor([0.0, 1, 0, 1]), None, "task_ids must be integers"),
    ("0101", None, "task_ids must be integers"),
    (torch.tensor([0, 1, 0]), None, "do not fit 3 task ids"),
    (torch.tensor([0, 1, 0, 1, 0, 1]), torch.ones(6, 2, dtype=torch.bool), "do not fit"),
    (torch.tensor([[0, 1, 0, 1]]), None, "shape"),
    (torch.tensor([], dtype=torch.long), None, "B >= 1"),
    (torch.tensor([0, 1, 0, 1]), torch.ones(4, 3), "bool or integer"),
    (torch.tensor([0, 1, 0, 1]), [[True] * 3] * 4, "bool or integer"),
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
    for zs, msg in [([torch.randn(4, 3, 2), torch.randn(4, 5, 2)], "same L"),   # layers disagree
                    ([torch.randn(4)], "do not fit"),
                    ([torch.randn(12, 2)], "with a mask"),               # flat tokens, no mask
                    ([(torch.randn(4, 3, 2),)], r"\[\(\)\] do not fit")]:      # not a tensor
        probe = Probe(len(zs))
        align = align_lora.AlignmentLoss(probe, 2)
        probe(*zs)
        with pytest.raises(ValueError, match=msg):
            align(torch.zeros(4, dtype=torch.long))


def test_flattened_and_many_dim_outputs_read_as_tokens():
    torch.manual_seed(0)
    z, ids = torch.randn(6, 4, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    mask = torch.rand(6, 4) > 0.2
    ref = loss_of([z], ids, mask)
    torch.testing.assert_close(loss_of([z.reshape(24, 3)], ids, mask), ref)   # (B*L, r)
    torch.testing.assert_close(loss_of([z.reshape(6, 2, 2, 3)], ids, mask), ref)   # (B, 2, 2, r)


@pytest.mark.parametrize("adapter", ["lora", "hydra", "mlora", "mtl"])
@pytest.mark.parametrize("kind", align_lora.KINDS)
def test_works_with_every_adapter_file(adapter, kind):
    """The loss finds lora_A in each adapter file's layers; its gradient reaches every A."""
    import mtl_lora
    import multihead_lora as mh
    torch.manual_seed(0)
    model = Tiny()
    add = {"lora": lambda: lora.add_lora(model, ["q", "up", "down"], r=4),
           "hydra": lambda: mh.add_multihead_lora(model, ["q", "up", "down"], r=4, router=True),
           "mlora": lambda: mh.add_multihead_lora(model, ["q", "up", "down"], r=4, router=False),
           "mtl": lambda: mtl_lora.add_mtl_lora(model, 3, ["q", "up", "down"], r=4)}[adapter]
    add()
    x, ids = torch.randn(6, 7, 12), torch.arange(6) % 3
    x[ids == 1] += 2.0                                       # tasks see different inputs
    mask = torch.ones(6, 7, dtype=torch.bool)
    mask[:, 5:] = False
    with align_lora.AlignmentLoss(model, 3, kind=kind) as align:
        assert len(align.names) == 6
        if adapter == "mtl":
            with mtl_lora.task_ids(model, ids):
                model(x)
        else:
            model(x)
        loss = align(ids, mask)
    assert loss > 0
    loss.backward()
    A = [m.lora_A.weight for m in model.modules() if hasattr(m, "lora_A")]
    assert len(A) == 6 and all(a.grad is not None and a.grad.abs().sum() > 0 for a in A)


AUTHORS_SIGMAS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1, 5, 10, 15, 20, 25, 30, 35, 100,
                  1e3, 1e4, 1e5, 1e6]                           # Align-LoRA's custom.py


def test_default_bandwidths_are_the_authors():
    assert align_lora.BANDWIDTHS == tuple(float(s) for s in AUTHORS_SIGMAS)
    import inspect
    assert inspect.signature(align_lora.AlignmentLoss).parameters["bandwidths"].default == \
        align_lora.BANDWIDTHS


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


@pytest.mark.parametrize("kind", align_lora.KINDS)
def test_statistics_sized_by_n_tasks(kind):
    """Tasks that are not in the batch take part in no pair: n_tasks changes nothing."""
    torch.manual_seed(0)
    zs, ids = [torch.randn(6, 4, 3)], torch.tensor([0, 1, 0, 1, 0, 1])
    ref = loss_of(zs, ids, n_tasks=2, kind=kind)
    torch.testing.assert_close(loss_of(zs, ids, n_tasks=50, kind=kind), ref)
    torch.testing.assert_close(loss_of(zs, ids + 7, n_tasks=9, kind=kind), ref)


def test_fused_kernel_sum_equals_plain_formula_values_and_gradients(monkeypatch):
    """The fused k = sum_s exp(-d2 / (2 sigma_s)) against the 19 separate kernels in float64, on
    a d2 with exact zeros (repeated tokens) and very large values (far tokens), over several
    blocks that do not divide m."""
    monkeypatch.setattr(align_lora, "BLOCK", 3 * 7 * 7)        # 7 x 7 blocks of a 40 x 40 d2
    torch.manual_seed(0)
    z = torch.randn(3, 40, 4) * torch.tensor([1e-3, 0.3, 3.0])[:, None, None]
    z[:, 10:15] = z[:, 3:4]                                     # repeated tokens: d2 = 0
    z[:, 30:] *= torch.tensor([1.0, 10.0, 1e3, 1e5])            # far tokens: d2 up to ~1e11
    d2 = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist").square().requires_grad_()
    W = torch.tensor([[1.0] * 19, [-1 / (2 * s) for s in AUTHORS_SIGMAS]])
    k = align_lora._KernelSum.apply(d2, W)
    d64 = d2.detach().double().requires_grad_()
    k64 = sum(torch.exp(-d64 / (2 * s)) for s in AUTHORS_SIGMAS)
    assert (d2 == 0).sum() > 3 * 40 and d2.max() > 1e10
    torch.testing.assert_close(k.double(), k64, rtol=1e-6, atol=1e-6)
    grad_k = torch.randn(3, 40, 40)
    k.backward(grad_k)
    k64.backward(grad_k.double())
    g64 = d64.grad
    torch.testing.assert_close(d2.grad.double(), g64, rtol=1e-5, atol=1e-6 * g64.abs().max().item())


@pytest.mark.parametrize("kind", align_lora.KINDS)
def test_loss_gradient_equals_plain_autograd_reference(kind):
    """d L_align / d z of the whole loss against the float64 loop reference's autograd."""
    torch.manual_seed(0)
    zs = [torch.randn(7, 5, 3, dtype=torch.float64) * 2 + 1, torch.randn(7, 5, 2).double()]
    zs[0][1, :2] = zs[0][0, :2]                                 # repeated tokens
    ids, mask = torch.tensor([2, 0, 1, 2, 0, 3, 1]), torch.rand(7, 5) > 0.3
    mask[:, 0] = True
    ref_z = [z.clone().requires_grad_() for z in zs]
    (kl_reference if kind == "kl" else mmd_reference)(ref_z, ids, mask).backward()
    our_z = [z.float().requires_grad_() for z in zs]
    loss_of(our_z, ids, mask, kind=kind).backward()
    for ours, ref in zip(our_z, ref_z):
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-4,
                                   atol=1e-5 * ref.grad.abs().max().item())


@pytest.mark.parametrize("kind", align_lora.KINDS)
def test_no_host_read_in_a_loss_call(kind, monkeypatch):
    """No .item/.tolist/bool/int/float/index of a tensor from the repository's code during the
    call (each would be a host-device sync per training step on a GPU), with padding and MMD's
    subsampling."""
    torch.manual_seed(0)
    model = Tiny()
    lora.add_lora(model, ["q", "up", "down"], r=4)
    align = align_lora.AlignmentLoss(model, 3, kind=kind, max_tokens=16)
    x, ids = torch.randn(6, 5, 12), torch.arange(6) % 3
    mask = torch.rand(6, 5) > 0.2
    repo = os.path.dirname(os.path.abspath(align_lora.__file__))
    reads = []
    for name in ["item", "tolist", "__bool__", "__int__", "__float__", "__index__"]:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _f=original, **kw):
            where = os.path.dirname(os.path.abspath(sys._getframe(1).f_code.co_filename))
            if where in (repo, os.path.join(repo, "tests")):   # the project's files, not ./.venv's
                reads.append(_name)
            return _f(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    torch.ones(1).item(), bool(torch.ones(1))                   # the counting works
    assert reads == ["item", "__bool__"]
    model(x)
    reads.clear()                                               # the loss call alone is counted
    loss = align(ids, mask)
    assert reads == []
    loss.backward()
    monkeypatch.undo()
    assert loss.item() > 0


def test_docstring_example_runs_and_explains_lambda():
    """The usage example runs as written; lambda's default is set against the authors' trainer,
    which adds lambda * L_align once per 10 accumulated micro-batches."""
    doc = align_lora.__doc__
    example = doc.split("Usage", 1)[1].split("\n\n", 2)[1]
    exec(textwrap.dedent(example), {})
    assert "once per 10 accumulated micro-batches" in doc and "lambda/10" in doc
