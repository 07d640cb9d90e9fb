"""spurious_reg.py's guards: bad input raising ValueError (or the device-side assert's
RuntimeError), and no host read in a training step. What MT-CRL computes:
tests/test_spurious_reg.py."""
import pytest
import torch

from helpers import count_host_reads
from spurious_reg import MTCRL, warmup_weight
from test_spurious_reg import random_graph, regression_setup


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw, msg", [(dict(d=10, n_modules=4), "n_modules dividing d"),
                                     (dict(n_modules=0), "'n_modules': 0"),
                                     (dict(n_tasks=0), "'n_tasks': 0"), (dict(d=8.0), "'d': 8.0"),
                                     (dict(n_envs=0), "'n_envs': 0"),
                                     (dict(n_envs=True), "'n_envs': True")])
def test_constructor_bad_inputs(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MTCRL(**(dict(d=8, n_tasks=2, n_modules=4) | kw))


def test_call_bad_inputs():
    crl = MTCRL(8, 2, 4)
    h, t, e = torch.randn(3, 5, 8), torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match=r"task_ids must be integers of shape \(3,\)"):
        crl(h, torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="shape"):
        crl(h, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        crl(h, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="integer"):             # uint8 would index as a mask
        crl(h, torch.tensor([0, 1, 1], dtype=torch.uint8))
    with pytest.raises(ValueError, match="d = 8"):
        crl(torch.randn(3, 5, 6), t)
    with pytest.raises(ValueError, match=r"mask \(3, 4\) must broadcast to h's tokens \(3, 5\)"):
        crl.decorrelation(h, torch.ones(3, 4, dtype=torch.bool))
    losses = (crl(h, t) ** 2).mean((1, 2))
    with pytest.raises(ValueError, match=r"env_ids must be integers of shape \(3,\)"):
        crl.invariance(losses, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="env_ids"):
        crl.invariance(losses, t, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="per-sample"):
        crl.invariance((crl(h, t) ** 2).mean(-1), t, e)
    with pytest.raises(ValueError, match=r"task_ids must be integers of shape \(2,\)"):
        crl.invariance(losses[:2], t, e)
    with pytest.raises(TypeError, match="kind"):                # the risk-variance option is gone
        crl.invariance(losses, t, e, kind="var")


def test_ids_may_be_lists_or_numpy_arrays():
    """As the README says, task and environment ids may be lists (or numpy arrays): the same
    output, penalties and gradients as with tensors (they were refused)."""
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    h, t, e = torch.randn(4, 3, 8), torch.tensor([0, 1, 1, 0]), torch.tensor([0, -1, 1, 1])

    def run(t, e):
        crl = MTCRL(8, 2, 4)
        losses = (crl(h, t) - 1).square().mean((1, 2))
        inv = crl.invariance(losses, t, e)
        inv.backward()
        return crl(h, t), inv, crl.G.grad
    ref = run(t, e)
    for t2, e2 in [(t.tolist(), e.tolist()), (t.numpy(), e.numpy()),
                   (np.array([0, 1, 1, 0], dtype=np.int32), [0, -1, 1, 1])]:
        for a, b in zip(run(t2, e2), ref):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="task_ids must be integers"):
        MTCRL(8, 2, 4)(h, [0.0, 1.0, 1.0, 0.0])


def test_task_ids_out_of_range_raise():
    crl = MTCRL(8, 2, 4)
    h = torch.randn(3, 5, 8)
    for bad in (2, -1):
        with pytest.raises(RuntimeError, match=r"task_ids must be in \[0, 1\]"):
            crl(h, torch.tensor([0, bad, 1]))
        losses = crl(h, torch.tensor([0, 1, 1])).square().mean((1, 2))
        with pytest.raises(RuntimeError, match=r"task_ids must be in \[0, 1\]"):
            crl.invariance(losses, torch.tensor([0, bad, 1]), torch.tensor([0, 1, 0]))


def test_env_ids_out_of_range_raise():
    crl, h, w, y, t, e = regression_setup(n_envs=2)         # envs 0 and 1 (and -1)
    losses = (crl(h, t) @ w - y) ** 2
    crl.invariance(losses, t, torch.where(e == 2, -1, e))   # in range: fine
    for bad in (2, -2):
        with pytest.raises(RuntimeError, match=r"env_ids must be in \[-1, 1\]"):
            crl.invariance(losses, t, torch.where(e == 2, bad, e))


def test_invariance_refuses_losses_that_do_not_depend_on_G():
    crl, h, w, y, t, e = regression_setup()
    hh = h.clone().requires_grad_()
    losses = (hh @ w - y) ** 2                              # grad exists, but not through G
    with pytest.raises(ValueError, match="do not depend on the graph G"):
        crl.invariance(losses, t, e)
    with pytest.raises(ValueError, match="do not depend on the graph G"):
        crl.invariance(losses.detach(), t, e)
    with torch.no_grad():                                   # evaluation: no penalty, no error
        assert crl.invariance((crl(h, t) @ w - y) ** 2, t, e) == 0


@pytest.mark.parametrize("args, msg", [((5, 100, 1.0), None), ((-1, 100, 1.0), "step=-1"),
                                       ((101, 100, 1.0), "step=101"), ((0, 10, -1.0), "weight=-1"),
                                       ((0, 10, float("inf")), "weight=inf"),
                                       ((0, 10, float("nan")), "weight=nan"),
                                       ((0, 10, 1.0, 1.5), "warmup=1.5"),
                                       ((0, 10, 1.0, -0.1), "warmup=-0.1")])
def test_warmup_weight_bad_inputs(args, msg):
    if msg is None:
        warmup_weight(*args)
        return
    with pytest.raises(ValueError, match=msg):
        warmup_weight(*args)


# ----------------------------------------------------------------------------- no host read

def test_no_host_read_in_training_step_calls(monkeypatch):
    reads = count_host_reads(monkeypatch, anywhere=True)      # torch's reads count too
    crl = random_graph(MTCRL(d=16, n_tasks=3, n_modules=4, n_envs=2))
    h = torch.randn(6, 5, 16, requires_grad=True)
    t, e = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 1, -1, 1, 0, -1])
    mask = torch.rand(6, 5) > 0.3
    out = crl(h, t)
    losses = out.square().mean((1, 2))
    loss = (losses.mean() + crl.decorrelation(h, mask) + crl.decorrelation(h) + crl.sparsity()
            + crl.invariance(losses, t, e))
    loss.backward()
    monkeypatch.undo()
    assert reads == [] and crl.G.grad.abs().sum() > 0
