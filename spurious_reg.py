"""MT-CRL: Improving Multi-Task Generalization via Regularizing Spurious Correlation
(Hu et al., NeurIPS 2022, arXiv 2205.09797).

In multi-task learning a feature that is causal for one task can be spurious for another, and
a shared model picks it up when labels of different tasks are correlated in the training data.
MT-CRL (a) cuts the shared representation into K modules, (b) learns which modules each task
may read (a task-to-module graph, kept sparse), and (c) learns that graph robustly with an
invariance penalty across environments. We could not consult the paper's formulas; every
component below is our reading of it. For a representation h (B, ..., d) and task t:

    modules     h = concat(h_1, ..., h_K)                 h_k: d/K features each
    graph       g_{t,k} = sigmoid(G_{t,k})                G: (T, K) logits, zeros at init
    forward     out = concat_k(g_{t,k} h_k)               = 0.5 h at init
    decorrelate mean_{k != l} mean(C_kl^2),   C = Z^T Z / N,  Z = h standardized over the batch
    sparsity    mean_{t,k} |g_{t,k}|                      (= mean g, since g > 0)
    invariance  sum_t mean_e || dR_t^e / dG_t ||^2        (IRMv1, G_t as the "classifier")
    loss        L_task + l_dec * decorrelate + l_sp * sparsity + warmup_weight(...) * invariance

R_t^e is the mean risk of task t's samples in environment e, e in [0, n_envs) (environments
come from the data; env id -1 marks a sample in no environment: its risk enters no R_t^e).
Only G trains in this file (T * K parameters); the decorrelation and invariance terms also send
gradients into whatever produced h. The invariance penalty is IRMv1 (Arjovsky et al. 2019,
arXiv 1907.02893): with K = 1 it is the IRMv1 penalty on a scalar multiplier of the task's
logits, scaled by the sigmoid's slope and taken at the current gate instead of at 1.

Where the gates sit: after the final LayerNorm, right before a bias-free linear output head.
There a gate scales its module's contribution to the logits; before a LayerNorm its scale would
be normalized away and its gradient would vanish. The paper's setting is a shared bottom read by
task heads; in our format the task token comes first, so every hidden state is already task-
conditioned, but the graph still decides which modules each task's answer may read.

Defaults: K = 4 modules and 2 environments (train.py's confounded task B is drawn in two
environments); train.py's weights l_dec = l_sp = 0.01 and invariance weight 10 from 30% of the
steps on (the weight chosen on validation draws of 3 seeds by benchmarks/tune_spurious.py; see
benchmarks/README.md).

Usage (losses are per-sample risks computed from forward()'s output, so they depend on G):

    import torch, torch.nn as nn, spurious_reg
    body, head = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16)), nn.Linear(16, 3, bias=False)
    crl, h = spurious_reg.MTCRL(d=16, n_tasks=2, n_envs=2), body(torch.randn(8, 8))  # final state
    t, e = torch.arange(8) % 2, torch.tensor([0, -1, 0, -1, 1, -1, 1, -1])  # task 1: no environment
    losses = nn.functional.cross_entropy(head(crl(h, t)), torch.randint(3, (8,)), reduction="none")
    lam = spurious_reg.warmup_weight(step=700, total_steps=1000, weight=10.0)  # 0 before step 300
    (losses.mean() + 0.01 * crl.decorrelation(h) + lam * crl.invariance(losses, t, e)).backward()

Our choices:
- Modules are K equal chunks of the final hidden state.
- Sigmoid gates, not softmax, so the L1 penalty can switch modules off independently.
- Gate logits start at 0 (g = 0.5 for all): every task reads every module at first.
- Decorrelation standardizes each feature over the batch's kept tokens (all tasks together,
  biased variance, eps 1e-5); only the off-diagonal K x K blocks of C are penalized; K = 1 gives 0.
- Env id -1: only task B has environments; random ids made IRMv1 a gradient-norm penalty elsewhere.
- The mean over e counts only the environments where task t has samples; a task with none adds 0.
- Warm-up: invariance weight 0 for the first 30% of steps, full weight after (IRM practice).
- Gates, risks, correlations and penalties are computed in fp32 (or wider).
"""
import numbers

import torch
import torch.nn as nn

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)   # uint8 indexes as a mask


class MTCRL(nn.Module):
    def __init__(self, d: int, n_tasks: int, n_modules: int = 4, n_envs: int = 2):
        super().__init__()
        _check_hparams(d=d, n_tasks=n_tasks, n_modules=n_modules, n_envs=n_envs)
        d, n_tasks, n_modules, n_envs = int(d), int(n_tasks), int(n_modules), int(n_envs)
        self.d, self.n_tasks, self.n_modules, self.n_envs = d, n_tasks, n_modules, n_envs
        self.G = nn.Parameter(torch.zeros(n_tasks, n_modules))          # graph logits G: (T, K)

    def gates(self) -> torch.Tensor:
        # g = sigmoid(G): (T, K) in (0, 1)
        return torch.sigmoid(_fp32_or_wider(self.G))

    def forward(self, h: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:  # h (B, ..., d)
        if not (torch.is_tensor(h) and h.dim() >= 2 and h.shape[-1] == self.d):
            raise ValueError(f"h must be a representation (B, ..., d) with d = {self.d} features, "
                             f"the d of MTCRL(d, ...); got shape {tuple(getattr(h, 'shape', ()))}")
        task_ids = self._ids(task_ids, h.shape[0], "task_ids", 0, self.n_tasks, self.G.device)
        K = self.n_modules
        # h_k: h cut into K modules, (B, ..., K, d/K)
        h_k = h.unflatten(-1, (K, self.d // K))
        # g_{t,k} for each sample's task t: (B, K), then (B, 1, ..., 1, K, 1)
        g = self.gates()[task_ids].to(h.dtype)
        g = g.view(h.shape[0], *[1] * (h.dim() - 2), K, 1)
        # out = concat_k(g_{t,k} h_k): (B, ..., d)
        return (g * h_k).flatten(-2)

    def sparsity(self) -> torch.Tensor:
        # mean_{t,k} |g_{t,k}| = mean g, as g > 0
        return self.gates().mean()

    def decorrelation(self, h: torch.Tensor, mask=None) -> torch.Tensor:
        """mean_{k != l} mean(C_kl^2) over the tokens where mask != 0 (mask: a tensor that
        broadcasts to h.shape[:-1], e.g. (B, L) answer tokens; None: all tokens)."""
        K, m = self.n_modules, self.d // self.n_modules
        x = _fp32_or_wider(h).reshape(-1, h.shape[-1])                  # (N, d) tokens
        keep = torch.ones((), dtype=torch.bool) if mask is None else torch.as_tensor(mask) != 0
        try:
            fits = torch.broadcast_shapes(keep.shape, h.shape[:-1]) == h.shape[:-1]
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"mask {tuple(keep.shape)} must broadcast to h's tokens "
                             f"{tuple(h.shape[:-1])}, e.g. (B, L) for h (B, L, d)")
        keep = keep.to(x.device).expand(h.shape[:-1]).reshape(-1, 1)    # (N, 1) kept tokens
        n = keep.sum().clamp(min=1).to(x.dtype)                         # N (no kept token: 0)
        x = torch.where(keep, x, 0.0)                                   # dropped values never enter
        # x - mu, mu = mean over the kept tokens: (N, d)
        xc = torch.where(keep, x - x.sum(0) / n, 0.0)
        # Z = (x - mu) / sqrt(var + eps), biased variance: (N, d)
        Z = xc * torch.rsqrt(xc.pow(2).sum(0) / n + 1e-5)
        # C = Z^T Z / N: (d, d) correlations
        C = Z.t() @ Z / n
        # mean(C_kl^2) for each module pair (k, l): (K, K)
        C2 = C.view(K, m, K, m).pow(2).mean(dim=(1, 3))
        # mean over the pairs k != l
        return (C2.sum() - C2.diagonal().sum()) / max(K * (K - 1), 1)

    def invariance(self, losses: torch.Tensor, task_ids: torch.Tensor,
                   env_ids: torch.Tensor) -> torch.Tensor:
        """IRMv1 on the graph rows, sum_t mean_e || dR_t^e / dG_t ||^2. losses: per-sample risks
        (B,) that depend on G through forward(h, task_ids); env_ids: (B,) in [0, n_envs), or -1
        for a sample in no environment (its risk enters no R_t^e). torch.compile(fullgraph=True)
        traces it with torch._dynamo.config.trace_autograd_ops = True (else a graph break)."""
        if not (torch.is_tensor(losses) and losses.dim() == 1 and losses.is_floating_point()):
            raise ValueError("losses must be per-sample risks (B,): reduce per-token losses first")
        T, E, B = self.n_tasks, self.n_envs, losses.shape[0]
        task_ids = self._ids(task_ids, B, "task_ids", 0, T, losses.device)
        env_ids = self._ids(env_ids, B, "env_ids", -1, E, losses.device)
        if not (self.G.requires_grad and torch.is_grad_enabled()):
            return self.G.new_zeros((), dtype=torch.float32)            # G does not train
        r = _fp32_or_wider(losses)                                      # (B,) per-sample risks
        in_t = (task_ids[:, None] == torch.arange(T, device=r.device)).to(r.dtype)  # (B, T) 1-hot
        in_e = (env_ids[:, None] == torch.arange(E, device=r.device)).to(r.dtype)   # (B, E), -1: 0
        n = in_t.t() @ in_e                                             # (T, E) samples of t in e
        # R_t^e = mean of r_i over task t's samples in environment e: (T, E)
        R = (in_t * r[:, None]).t() @ in_e / n.clamp(min=1)
        # dR_t^e / dG_t for all t: row t of d(sum_t R_t^e) / dG, as R_t^e reads only G_t: (E, T, K)
        G, dR = self.G, []
        for e in range(E):
            dR.append(torch.autograd.grad(R[:, e].sum(), G, create_graph=True, allow_unused=True)[0]
                      if R.requires_grad else None)
            if self.G is not G:                 # swapped by an engine's backward hooks (FSDP2)
                raise ValueError(_ENGINE)
        if all(g is None for g in dR):
            raise ValueError("the losses do not depend on the graph G: compute them from the "
                             "output of crl(h, task_ids), e.g. head(crl(h, task_ids)), not from h")
        dR = torch.stack([torch.zeros_like(G) if g is None else g for g in dR])
        # ||dR_t^e / dG_t||^2: (T, E), exactly 0 where task t has no sample in e
        sq = _fp32_or_wider(dR).pow(2).sum(-1).t()
        # sum_t mean_e, the mean over the environments where task t has samples (none: adds 0)
        return (sq.sum(1) / (n > 0).sum(1).clamp(min=1)).sum()

    @staticmethod
    def _ids(ids, B, name, lo, hi, device):
        """ids (a tensor, list or numpy array) as a LongTensor (B,) on `device`, checked."""
        try:
            ids = torch.as_tensor(ids, device=device)
        except (TypeError, ValueError, RuntimeError):
            ids = None
        if not (ids is not None and ids.dtype in _INT_DTYPES and ids.shape == (B,)):
            raise ValueError(f"{name} must be integers of shape ({B},), one id per sample (a "
                             "tensor, a list or a numpy array)")
        torch._assert_async(((ids >= lo) & (ids < hi)).all(), f"{name} must be in [{lo}, {hi - 1}]")
        return ids.long()

    def extra_repr(self):
        return (f"d={self.d}, n_tasks={self.n_tasks}, n_modules={self.n_modules}, "
                f"n_envs={self.n_envs}")


_ENGINE = ("the invariance penalty differentiates through the head and G twice, and FSDP2 "
           "reshards what fully_shard wraps inside that torch.autograd.grad: keep MTCRL and the "
           "head out of fully_shard (average G's gradient over the processes), or use DDP")


def _fp32_or_wider(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_hparams(**kw):
    ints = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1
               for v in kw.values())
    if not ints or kw["d"] % kw["n_modules"]:
        raise ValueError(f"MTCRL needs integers >= 1 with n_modules dividing d, got {kw}")


def warmup_weight(step, total_steps, weight, warmup=0.3) -> float:
    """Invariance weight at `step`: 0 for the first `warmup` fraction of steps, `weight` after."""
    if not (0 <= step <= total_steps and 0 <= warmup <= 1 and 0 <= weight < float("inf")):
        raise ValueError(f"need 0 <= step <= total_steps, 0 <= warmup <= 1, 0 <= weight < inf, "
                         f"got {step=}, {total_steps=}, {warmup=}, {weight=}")
    return 0.0 if step < warmup * total_steps else float(weight)
