"""What MT-CRL computes: gates g = sigmoid(G) per task and module, out = concat_k(g_{t,k} h_k); the
decorrelation, sparsity and IRMv1 invariance penalties; the invariance weight's warm-up
(guards: tests/test_spurious_reg_guards.py)."""
import pytest
import torch
import torch.nn as nn

from spurious_reg import MTCRL, warmup_weight


def random_graph(crl, seed=0):
    g = torch.Generator().manual_seed(seed)
    crl.G.data = torch.randn(crl.G.shape, generator=g, dtype=crl.G.dtype)
    return crl


def reference_decorrelation(h, K):
    """Per module pair, from torch.corrcoef (unbiased/biased factors cancel in a correlation)."""
    C = torch.corrcoef(h.double().T)
    m = h.shape[1] // K
    vals = [C[k * m:(k + 1) * m, l * m:(l + 1) * m].pow(2).mean()
            for k in range(K) for l in range(K) if k != l]
    return torch.stack(vals).mean().float()


def regression_setup(dtype=torch.float32, seed=0, n_envs=3):
    """Tiny squared-error problem: pred_i = sum_k g[t_i, k] * (h_ik . w_k)."""
    g = torch.Generator().manual_seed(seed)
    crl = random_graph(MTCRL(d=6, n_tasks=3, n_modules=3, n_envs=n_envs).to(dtype), seed)
    h = torch.randn(10, 6, generator=g, dtype=dtype)
    w = torch.randn(6, generator=g, dtype=dtype)
    y = torch.randn(10, generator=g, dtype=dtype)
    t = torch.tensor([0, 0, 1, 1, 2, 0, 0, 1, 1, 2])        # tasks 0, 1 in two of three envs,
    e = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 1])        # task 2 only in env 1
    return crl, h, w, y, t, e


def closed_form_grads(crl, h, w, y, t, e):
    """dR_t^e/dG_t by hand: mean_i 2 (pred_i - y_i) (h_ik . w_k) * g_tk (1 - g_tk)."""
    g = torch.sigmoid(crl.G.detach())
    s = (h * w).view(len(h), 3, 2).sum(-1)                  # (B, K) module scores h_k . w_k
    pred = (g[t] * s).sum(-1)
    out = {}
    for task in range(3):
        for env in e[e >= 0].unique().tolist():            # env -1: no environment
            sel = (t == task) & (e == env)
            if sel.any():
                dR_dg = (2 * (pred - y)[sel, None] * s[sel]).mean(0)
                out[task, env] = dR_dg * g[task] * (1 - g[task])
    return out


def hand_irm(crl, h, w, y, t, e):
    """sum_t mean_e ||dR_t^e/dG_t||^2 over the environments where task t has samples."""
    grads = closed_form_grads(crl, h, w, y, t, e)
    total = torch.zeros((), dtype=h.dtype)
    for task in range(3):
        gs = [v for (tt, _), v in grads.items() if tt == task]
        if gs:
            total = total + sum(v.pow(2).sum() for v in gs) / len(gs)
    return total


@pytest.mark.parametrize("shape", [(6, 12), (6, 5, 12), (6, 2, 3, 12)])
def test_forward_equals_per_sample_loop(shape):
    """out = concat_k(sigmoid(G_{t,k}) h_k), written as a loop over samples and modules."""
    crl = random_graph(MTCRL(d=12, n_tasks=3, n_modules=3))
    h = torch.randn(shape)
    t = torch.tensor([2, 0, 1, 1, 2, 0])
    g = torch.sigmoid(crl.G)
    ref = torch.empty_like(h)
    for b in range(shape[0]):
        for k in range(3):
            ref[b, ..., 4 * k:4 * (k + 1)] = g[t[b], k] * h[b, ..., 4 * k:4 * (k + 1)]
    torch.testing.assert_close(crl(h, t), ref)
    assert crl(h.bfloat16(), t).dtype == torch.bfloat16


def test_init_gates_half_forward_half_h_and_param_count():
    """G = 0 at init: every gate is 0.5 and out = 0.5 h; only G trains, T * K parameters."""
    crl = MTCRL(d=12, n_tasks=3, n_modules=4)
    assert crl.G.shape == (3, 4) and torch.count_nonzero(crl.G) == 0
    assert torch.equal(crl.gates(), torch.full((3, 4), 0.5))
    assert [n for n, _ in crl.named_parameters()] == ["G"] and list(crl.state_dict()) == ["G"]
    h = torch.randn(5, 7, 12)
    assert torch.equal(crl(h, torch.tensor([0, 1, 2, 1, 0])), 0.5 * h)
    big = MTCRL(d=4096, n_tasks=8, n_modules=16, n_envs=5)
    assert sum(p.numel() for p in big.parameters()) == 8 * 16
    assert (crl.n_envs, big.n_envs) == (2, 5) and "n_envs=5" in repr(big)


def test_forward_gradient_reaches_only_used_rows():
    """Only the rows G_t of the batch's tasks get a gradient."""
    crl = random_graph(MTCRL(d=8, n_tasks=3, n_modules=2))
    crl(torch.randn(4, 8), torch.tensor([0, 2, 0, 2])).sum().backward()
    assert crl.G.grad[1].abs().sum() == 0 and crl.G.grad[[0, 2]].abs().min() > 0


def test_decorrelation_copies_and_formula():
    """mean_{k != l} mean(C_kl^2) equals torch.corrcoef's; copied modules give 1, K = 1 gives 0."""
    u = torch.randn(50, 1)
    assert MTCRL(4, 1, 4).decorrelation(u.repeat(1, 4)).item() == pytest.approx(1.0, abs=1e-4)
    u = torch.randn(50, 3)
    copies = torch.cat([u, u], dim=1)                       # module 2 copies module 1
    val = MTCRL(6, 1, 2).decorrelation(copies)
    assert val > 0.3
    torch.testing.assert_close(val, reference_decorrelation(copies, 2), atol=1e-4, rtol=1e-4)
    mixed = torch.randn(40, 12) @ torch.randn(12, 12)       # arbitrary correlations
    torch.testing.assert_close(MTCRL(12, 1, 3).decorrelation(mixed),
                               reference_decorrelation(mixed, 3), atol=1e-4, rtol=1e-4)
    assert MTCRL(12, 1, 1).decorrelation(mixed) == 0        # K = 1: no module pairs


def test_decorrelation_zero_for_uncorrelated_modules():
    """Uncorrelated features give 0."""
    N, d = 64, 8
    x = torch.randn(N, d, dtype=torch.float64)
    Q, _ = torch.linalg.qr(x - x.mean(0))                  # centered, orthonormal columns
    h = (Q * N ** 0.5).float()                             # unit variance, zero correlation
    assert MTCRL(d, 1, 4).decorrelation(h).abs() < 1e-6
    assert MTCRL(d, 1, 2).decorrelation(h).abs() < 1e-6


def test_decorrelation_mask_excludes_tokens():
    """Masked tokens take no part, whatever their values; a (B, 1) mask drops whole samples."""
    torch.manual_seed(0)
    crl = MTCRL(8, 2, 4)
    h = torch.randn(4, 6, 8) @ torch.randn(8, 8)
    mask = torch.rand(4, 6) > 0.3
    ref = crl.decorrelation(h[mask])                        # kept tokens only, (N, d)
    h_bad = h.clone()
    h_bad[~mask] = 1e30
    torch.testing.assert_close(crl.decorrelation(h_bad, mask), ref)
    h_bad[~mask] = float("nan")
    torch.testing.assert_close(crl.decorrelation(h_bad, mask.float()), ref)
    assert not torch.allclose(crl.decorrelation(h), ref)
    per_sample = torch.tensor([True, False, True, True])[:, None]   # (B, 1) broadcasts over tokens
    torch.testing.assert_close(crl.decorrelation(h, per_sample), crl.decorrelation(h[[0, 2, 3]]))


def test_sparsity_is_mean_gate():
    """sparsity = mean_{t,k} g_{t,k}, with a gradient on every G_{t,k}."""
    crl = random_graph(MTCRL(8, 3, 4))
    torch.testing.assert_close(crl.sparsity(), torch.sigmoid(crl.G).mean())
    crl.sparsity().backward()
    assert crl.G.grad.abs().min() > 0


def test_invariance_irm_equals_hand_computation():
    """invariance = sum_t mean_e ||dR_t^e/dG_t||^2 equals the closed-form gradients, by hand."""
    crl, h, w, y, t, e = regression_setup()
    losses = (crl(h, t) @ w - y) ** 2
    irm = hand_irm(crl, h, w, y, t, e)
    torch.testing.assert_close(crl.invariance(losses, t, e), irm)
    assert irm > 0


def test_invariance_single_environment_equals_hand_computation():
    """One environment: the hand computation still holds (sum_t ||dR_t/dG_t||^2)."""
    crl, h, w, y, t, _ = regression_setup()
    one_env = torch.zeros_like(t)
    losses = (crl(h, t) @ w - y) ** 2
    irm = hand_irm(crl, h, w, y, t, one_env)
    torch.testing.assert_close(crl.invariance(losses, t, one_env), irm)


def test_invariance_gradient_flows_and_matches_finite_difference():
    """The penalty's gradient in G matches finite differences, and reaches what made h."""
    crl, h, w, y, t, e = regression_setup(torch.float64)
    body = nn.Linear(6, 6).double()

    def penalty():
        losses = (crl(body(h), t) @ w - y) ** 2
        return crl.invariance(losses, t, e)

    penalty().backward()
    assert body.weight.grad.abs().sum() > 0                 # create_graph: reaches what made h
    eps = 1e-6
    for idx in [(0, 0), (1, 2), (2, 1)]:
        with torch.no_grad():
            crl.G[idx] += eps
        up = penalty().item()
        with torch.no_grad():
            crl.G[idx] -= 2 * eps
        down = penalty().item()
        with torch.no_grad():
            crl.G[idx] += eps
        assert crl.G.grad[idx].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5)


def test_invariance_zero_when_every_risk_gradient_is_zero():
    """A perfect fit (zero risk gradients) gives 0."""
    crl, h, w, y, t, e = regression_setup()
    pred = crl(h, t) @ w
    losses = (pred - pred.detach()) ** 2                    # perfect fit: zero gradient everywhere
    assert crl.invariance(losses, t, e) == 0


def test_env_minus_one_samples_are_skipped():
    """Samples with env id -1 enter no R_t^e: the penalty is the one on the batch without them."""
    crl, h, w, y, t, _ = regression_setup(n_envs=2)         # default n_envs = 2 (old code's args)
    e = torch.tensor([0, 0, -1, 1, -1, 1, 1, 0, -1, 1])     # three samples in no environment
    losses = (crl(h, t) @ w - y) ** 2
    kept = e >= 0
    irm_kept = hand_irm(crl, h[kept], w, y[kept], t[kept], e[kept])
    torch.testing.assert_close(crl.invariance(losses, t, e), irm_kept)
    torch.testing.assert_close(crl.invariance(losses[kept], t[kept], e[kept]), irm_kept)
    assert irm_kept > 0


def test_task_with_no_environment_adds_zero():
    """A task with no environment adds 0 and its row of G gets no gradient."""
    crl, h, w, y, t, _ = regression_setup(n_envs=2)
    e = torch.where(t == 2, -1, torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 1]))   # task 2: none
    losses = (crl(h, t) @ w - y) ** 2
    pen = crl.invariance(losses, t, e)
    irm = hand_irm(crl, h, w, y, t, e)                      # tasks 0 and 1 only
    torch.testing.assert_close(pen, irm)
    pen.backward()
    assert crl.G.grad[2].abs().sum() == 0 and crl.G.grad[:2].abs().min() > 0
    crl.G.grad = None
    assert crl.invariance((crl(h, t) @ w - y) ** 2, t, torch.full_like(t, -1)) == 0


def test_warmup_weight_schedule():
    """The invariance weight is 0 before the warm-up fraction, full after."""
    assert [warmup_weight(s, 100, 10.0) for s in (0, 29, 30, 99, 100)] == [0, 0, 10, 10, 10]
    assert warmup_weight(0, 100, 2.5, warmup=0.0) == 2.5 and warmup_weight(99, 100, 2.5, 1.0) == 0
    assert warmup_weight(49, 100, 1, warmup=0.5) == 0 and warmup_weight(50, 100, 1, 0.5) == 1.0


def test_docstring_points_to_where_the_invariance_weight_was_chosen():
    """The weight choice lives in benchmarks/ (tune_spurious.py, README.md), not the top README."""
    import os
    import spurious_reg
    from helpers import ROOT
    doc = " ".join(spurious_reg.__doc__.split())
    assert "benchmarks/tune_spurious.py" in doc and "benchmarks/README.md" in doc
    assert "see the README" not in doc
    assert os.path.exists(os.path.join(ROOT, "benchmarks", "tune_spurious.py"))
    assert "tune_spurious.py" in open(os.path.join(ROOT, "benchmarks", "README.md")).read()
