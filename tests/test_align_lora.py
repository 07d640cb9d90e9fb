"""What Align-LoRA's loss computes: L_align, the mean over task pairs and adapted layers of a
divergence D (symmetric KL of diagonal Gaussians, or MMD^2) between the tasks' z = A drop(x)
(guards: tests/test_align_lora_guards.py)."""
import itertools

import pytest
import torch
import torch.nn as nn

import align_lora
import lora
from helpers import Tiny


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
    """1/2 [KL(p_i||p_j) + KL(p_j||p_i)] of 1-D Gaussians N(m, v), per dimension."""
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
    """Per layer: loop over task pairs, M_ii + M_jj - 2 M_ij of the pooled real tokens (float64)."""
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


AUTHORS_SIGMAS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1, 5, 10, 15, 20, 25, 30, 35, 100,
                  1e3, 1e4, 1e5, 1e6]                           # Align-LoRA's custom.py


def test_kl_equals_hand_computed_closed_form():
    """The symmetric KL of two diagonal Gaussians by hand: one layer, the mean of two layers."""
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
    """L_align equals a loop over layers, tasks and task pairs of the pooled real tokens."""
    torch.manual_seed(0)
    zs = [torch.randn(7, 5, 3) * 2 + 1, torch.randn(7, 5, 2)]
    ids = torch.tensor([2, 0, 1, 2, 0, 3, 1])
    mask = torch.rand(7, 5) > 0.3
    mask[:, 0] = True
    mask[5] = torch.tensor([True, False, False, False, False])   # task 3 has one real token: absent
    ref = (kl_reference if kind == "kl" else mmd_reference)(zs, ids, mask)
    torch.testing.assert_close(loss_of(zs, ids, mask, kind=kind), ref.float(), rtol=1e-4, atol=1e-5)


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


def test_fused_kernel_sum_equals_plain_formula_values_and_gradients(monkeypatch):
    """The fused sum_xy C_xy k(d_xy), k = sum_s exp(-d^2 / (2 sigma_s)), against the 19 separate
    kernels in float64 (within 1e-6, relative), on distances with exact zeros (repeated tokens) and
    very large values (far tokens), over several blocks that do not divide m. Its gradient at d_xy
    is the plain gradient's at d_xy plus at d_yx (the loss differentiates d through its rows'
    tokens only: d_xy and d_yx are one function of the tokens)."""
    monkeypatch.setattr(align_lora, "BLOCK", 3 * 7 * 7)        # 7 x 7 blocks of a 40 x 40 d
    torch.manual_seed(0)
    z = torch.randn(3, 40, 4) * torch.tensor([1e-3, 0.3, 3.0])[:, None, None]
    z[:, 10:15] = z[:, 3:4]                                     # repeated tokens: d = 0
    z[:, 30:] *= torch.tensor([1.0, 10.0, 1e3, 1e5])            # far tokens: d^2 up to ~1e11
    d = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist")
    assert (d == 0).sum() > 3 * 40 and d.max() ** 2 > 1e10
    W = align_lora.AlignmentLoss(Probe(), 2)._W                 # the default bandwidths'
    weights = torch.rand(40, 40)
    for C in (torch.ones(40, 40), weights + weights.t()):
        x, d64 = d.clone().requires_grad_(), d.double().requires_grad_()
        loss = align_lora._KernelSum.apply(x, C, W)
        ref = (C.double() * sum(torch.exp(-d64 ** 2 / (2 * s)) for s in AUTHORS_SIGMAS)).sum()
        assert abs(loss.item() - ref.item()) < 1e-6 * ref.item()
        loss.backward()
        (g64,) = torch.autograd.grad(ref, d64)
        torch.testing.assert_close(x.grad.double(), g64 + g64.mT, rtol=1e-5,
                                   atol=1e-6 * g64.abs().max().item())


@pytest.mark.parametrize("kind", ["kl", "mmd"])
def test_zero_for_identical_tasks_symmetric_and_nonnegative(kind):
    """D is a divergence: 0 for tasks of the same tokens, symmetric in the tasks, never negative."""
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
    """With three tasks, L_align is the mean of the three pairs'."""
    torch.manual_seed(1)
    z = torch.randn(9, 4, 3) + torch.arange(9)[:, None, None] % 3
    ids = torch.arange(9) % 3
    pair = [loss_of([z[(ids == i) | (ids == j)]], ids[(ids == i) | (ids == j)], kind=kind)
            for i, j in [(0, 1), (0, 2), (1, 2)]]
    torch.testing.assert_close(loss_of([z], ids, kind=kind), sum(pair) / 3)


@pytest.mark.parametrize("kind", ["kl", "mmd"])
def test_padding_is_ignored_even_when_huge(kind):
    """Masked tokens take no part, whatever their values (1e30, inf, nan)."""
    torch.manual_seed(0)
    z, ids = torch.randn(6, 5, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[:, 3:] = False
    ref = loss_of([z[:, :3]], ids, kind=kind)                   # the real tokens alone
    for junk in (1e30, float("inf"), float("nan")):
        padded = z.clone()
        padded[:, 3:] = junk
        torch.testing.assert_close(loss_of([padded], ids, mask, kind=kind), ref)


@pytest.mark.parametrize("kind", ["kl", "mmd"])
def test_fewer_than_two_tasks_gives_zero(kind):
    """Fewer than two tasks with >= 2 real tokens: an fp32 zero, attached to the graph."""
    z = torch.randn(4, 3, 2, requires_grad=True)
    for ids, mask in [(torch.zeros(4, dtype=torch.long), None),
                      (torch.tensor([0, 0, 0, 1]),                     # task 1: one real token
                       torch.tensor([[True] * 3] * 3 + [[True, False, False]]))]:
        loss = loss_of([z], ids, mask, kind=kind)
        assert loss.dtype == torch.float32 and loss.shape == () and loss.item() == 0.0
        loss.backward()                                         # attached, zero gradient
        assert torch.count_nonzero(z.grad) == 0


@pytest.mark.parametrize("kind", align_lora.KINDS)
def test_statistics_sized_by_n_tasks(kind):
    """Tasks that are not in the batch take part in no pair: n_tasks changes nothing."""
    torch.manual_seed(0)
    zs, ids = [torch.randn(6, 4, 3)], torch.tensor([0, 1, 0, 1, 0, 1])
    ref = loss_of(zs, ids, n_tasks=2, kind=kind)
    torch.testing.assert_close(loss_of(zs, ids, n_tasks=50, kind=kind), ref)
    torch.testing.assert_close(loss_of(zs, ids + 7, n_tasks=9, kind=kind), ref)


def test_mmd_subsample_is_bounded_deterministic_and_skips_padding():
    """MMD draws at most max_tokens real tokens, with torch's RNG: seeded, it repeats."""
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


def test_gradients_reach_only_lora_A():
    """L_align's gradient reaches every A; the base stays frozen; the last layer's B gets none."""
    torch.manual_seed(0)
    model = Tiny()
    lora.add_lora(model, targets=["q", "up", "down"], r=4, dropout=0.1)
    align = align_lora.AlignmentLoss(model, 3)
    assert align.names == [f"blocks.{i}.{t}.lora_A" for i in range(2) for t in ["q", "up", "down"]]
    model(torch.randn(6, 5, 12))
    align(torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    for n, p in model.named_parameters():
        if ".lora_A." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        elif ".lora_" not in n:
            assert p.grad is None, n                           # the base: frozen
    # B moves only through later layers' inputs: the last adapted layer's B gets nothing
    assert model.blocks[1]["down"].lora_B.weight.grad is None


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


def test_default_bandwidths_are_the_authors():
    """The 19 MMD bandwidths sigma_s are the authors' (Align-LoRA's custom.py)."""
    assert align_lora.BANDWIDTHS == tuple(float(s) for s in AUTHORS_SIGMAS)
    import inspect
    assert inspect.signature(align_lora.AlignmentLoss).parameters["bandwidths"].default == \
        align_lora.BANDWIDTHS


def test_docstring_sets_lambda_against_the_authors_trainer():
    """lambda's default is set against the authors' trainer, which adds lambda * L_align once per
    10 accumulated micro-batches."""
    doc = align_lora.__doc__
    assert "once per 10 accumulated micro-batches" in doc and "lambda/10" in doc
