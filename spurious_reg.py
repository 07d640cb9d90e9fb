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
    forward     out = concat_k(g_{t,k} * h_k)             = 0.5 * h at init
    decorrelate mean over module pairs k != l of mean(C_kl^2),  C = Z^T Z / N, Z = h standardized
    sparsity    mean_{t,k} |g_{t,k}|                      (= mean g, since g > 0)
    invariance  "irm": sum_t mean_e || dR_t^e / dG_t ||^2                       (default)
                "var": sum_t mean_e || dR_t^e / dG_t - mean_e' dR_t^e' / dG_t ||^2
    loss        L_task + l_dec * decorrelate + l_sp * sparsity + warmup_weight(...) * invariance

R_t^e is the mean per-sample risk of task t's samples in environment e (environments come from
the data: here, the confounded splits the data loader marks). Only G trains in this file
(T * K parameters); the decorrelation and invariance terms also send gradients into whatever
produced h. The invariance penalty is IRMv1 (Arjovsky et al. 2019, arXiv 1907.02893) with the
graph row G_t as the "classifier": with K = 1 it is the probe's IRMv1 penalty (a scalar on the
task's logits), scaled by the sigmoid's slope and taken at the current gate instead of at 1.

Where the gates sit: after the final LayerNorm, right before a bias-free linear output head.
There a gate scales its module's contribution to the logits; before a LayerNorm its scale would
be normalized away and its gradient would vanish. The paper's setting is a shared bottom read by
task heads; in our format the task token comes first, so every hidden state is already task-
conditioned, but the graph still decides which modules each task's answer may read.

Our choice: modules are K equal chunks of the final hidden state (K = 4 by default).
Our choice: sigmoid gates, not softmax, so the L1 penalty can switch modules off independently.
Our choice: gate logits start at 0 (g = 0.5 for all): every task reads every module at first.
Our choice: decorrelation standardizes each feature over the batch's unmasked tokens (all tasks
  together, biased variance, eps 1e-5) and forms one (d x d) correlation matrix; only its
  off-diagonal K x K blocks are penalized. K = 1 has no module pairs and gives 0.
Our choice: "irm" is the default (on our benchmark an IRMv1-style penalty removed the shortcut);
  "var" (the variance of the risk gradients across environments, in the spirit of V-REx's risk
  variance) is zero whenever all environments agree, not only at a stationary point.
Our choice: the mean over e counts only environments where task t has samples; a task seen in
  fewer than two environments adds 0 to "var". The penalty is summed over tasks.
Our choice: warm-up: invariance weight 0 for the first 30% of steps, full weight after (IRM
  practice; the probe used weight 10 from 30% on; tune the weight on a validation draw).
Our choice: gates, risks, correlations and penalties are computed in fp32.

Usage (losses are per-sample risks computed from forward()'s output, so they depend on G):

    import torch, torch.nn as nn, spurious_reg
    body, head = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16)), nn.Linear(16, 3, bias=False)
    crl, h = spurious_reg.MTCRL(d=16, n_tasks=2), body(torch.randn(8, 8))  # h: final hidden state
    t, e = torch.arange(8) % 2, torch.arange(8) // 4         # task and environment id per sample
    losses = nn.functional.cross_entropy(head(crl(h, t)), torch.randint(3, (8,)), reduction="none")
    lam = spurious_reg.warmup_weight(step=700, total_steps=1000, weight=10.0)  # 0 before step 300
    (losses.mean() + 0.1 * crl.decorrelation(h) + lam * crl.invariance(losses, t, e)).backward()
"""
import torch
import torch.nn as nn

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class MTCRL(nn.Module):
    def __init__(self, d: int, n_tasks: int, n_modules: int = 4):
        super().__init__()
        _check_hparams(d, n_tasks, n_modules)
        self.d, self.n_tasks, self.n_modules = d, n_tasks, n_modules
        self.G = nn.Parameter(torch.zeros(n_tasks, n_modules))          # graph logits (T, K)
        off = 1.0 - torch.eye(n_modules)                                # (K, K) 1 where k != l
        self.register_buffer("off_blocks", off, persistent=False)

    def gates(self) -> torch.Tensor:                                    # (T, K) in (0, 1)
        return torch.sigmoid(_fp32_or_wider(self.G))

    def forward(self, h: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:  # h (B, ..., d)
        self._check_h(h)
        self._check_ids(task_ids, h.shape[0], "task_ids", self.n_tasks)
        K = self.n_modules
        g = self.gates()[task_ids.long()].to(h.dtype)                   # (B, K)
        g = g.view(g.shape[0], *([1] * (h.dim() - 2)), K, 1)            # (B, 1.., K, 1)
        return (h.unflatten(-1, (K, self.d // K)) * g).flatten(-2)      # (B, ..., d)

    def sparsity(self) -> torch.Tensor:
        return self.gates().abs().mean()

    def decorrelation(self, h: torch.Tensor, mask=None) -> torch.Tensor:
        """Mean squared correlation between features of different modules over kept tokens."""
        self._check_h(h)
        K, m = self.n_modules, self.d // self.n_modules
        x = _fp32_or_wider(h).reshape(-1, self.d)                       # (N, d)
        if mask is None:
            keep = torch.ones(x.shape[0], 1, device=x.device, dtype=torch.bool)
        else:
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(h.shape[:-1]):
                got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"mask must be a tensor of shape h.shape[:-1] = "
                                 f"{tuple(h.shape[:-1])} (nonzero = keep the token), got {got}")
            keep = (mask != 0).reshape(-1, 1).to(x.device)              # (N, 1)
        n = keep.sum().clamp(min=1).to(x.dtype)                            # no tokens -> loss 0
        x = torch.where(keep, x, 0.0)                                   # masked values never enter
        xc = torch.where(keep, x - x.sum(0) / n, 0.0)                   # (N, d) centered
        z = xc * torch.rsqrt(xc.pow(2).sum(0) / n + 1e-5)               # (N, d) standardized
        C = (z.t() @ z) / n                                             # (d, d) correlations
        block = C.view(K, m, K, m).pow(2).mean(dim=(1, 3))              # (K, K) mean(C_kl^2)
        return (block * self.off_blocks).sum() / max(K * (K - 1), 1)

    def invariance(self, losses: torch.Tensor, task_ids: torch.Tensor, env_ids: torch.Tensor,
                   kind: str = "irm") -> torch.Tensor:
        """IRMv1-style penalty on the graph rows; losses: per-sample risks (B,) that depend on G."""
        if kind not in ("irm", "var"):
            raise ValueError(f"kind must be 'irm' (IRMv1, default) or 'var' (gradient variance "
                             f"across environments), got {kind!r}")
        is_t = isinstance(losses, torch.Tensor)
        if not (is_t and losses.dim() == 1 and losses.is_floating_point()):
            got = f"{tuple(losses.shape)} {losses.dtype}" if is_t else type(losses).__name__
            raise ValueError(f"losses must be a 1-D float tensor of per-sample risks (B,), got "
                             f"{got}; reduce per-token losses first (reduction='none', then the "
                             "mean over each sample's answer tokens)")
        B, T = losses.shape[0], self.n_tasks
        self._check_ids(task_ids, B, "task_ids", T)
        self._check_ids(env_ids, B, "env_ids", None)
        if not (losses.requires_grad and self.G.requires_grad and torch.is_grad_enabled()):
            return self.G.new_zeros((), dtype=torch.float32)            # nothing depends on G
        envs, env = torch.unique(env_ids.to(losses.device), return_inverse=True)  # env (B,)
        E = envs.numel()
        cell = task_ids.to(losses.device).long() * E + env              # (B,) index of (t, e)
        r = _fp32_or_wider(losses)                                      # (B,)
        risk_sum = r.new_zeros(T * E).index_add(0, cell, r)             # (T*E,)
        count = r.new_zeros(T * E).index_add(0, cell, torch.ones_like(r))
        R = (risk_sum / count.clamp(min=1)).view(T, E)                  # (T, E) R_t^e
        grads = []
        for e in range(E):        # one grad per environment; row t of dR^e/dG is dR_t^e/dG_t
            g, = torch.autograd.grad(R[:, e].sum(), self.G, create_graph=True, allow_unused=True)
            grads.append(r.new_zeros(T, self.n_modules) if g is None else g.to(r.dtype))
        grads = torch.stack(grads)                                      # (E, T, K)
        present = (count.view(T, E) > 0).t().float()                    # (E, T)
        n_env = present.sum(0)                                          # (T,) envs per task
        if kind == "irm":
            per_task = (grads.pow(2).sum(-1) * present).sum(0) / n_env.clamp(min=1)  # (T,)
        else:
            mean_g = (grads * present[..., None]).sum(0) / n_env.clamp(min=1)[:, None]  # (T, K)
            dev = (grads - mean_g).pow(2).sum(-1) * present             # (E, T)
            per_task = dev.sum(0) / n_env.clamp(min=1)      # (T,) 0 when seen in one env
        return per_task.sum()

    def _check_h(self, h):
        if not isinstance(h, torch.Tensor) or h.dim() < 2 or h.shape[-1] != self.d:
            got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise ValueError(f"h must be a tensor (B, ..., d) with d = {self.d} "
                             f"(the size MTCRL was built with), got {got}")

    @staticmethod
    def _check_ids(ids, B, name, n):
        if not isinstance(ids, torch.Tensor) or ids.dtype not in _INT_DTYPES:
            got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(f"{name} must be an integer tensor (e.g. torch.long), got {got}")
        if ids.dim() != 1 or ids.shape[0] != B:
            raise ValueError(f"{name} must have shape (B,) = ({B},), one id per sample, "
                             f"got {tuple(ids.shape)}")
        if n is not None and B > 0 and bool(((ids < 0) | (ids >= n)).any()):
            raise ValueError(f"{name} must lie in [0, {n - 1}] (MTCRL was built with n_tasks="
                             f"{n}), got values in [{int(ids.min())}, {int(ids.max())}]")

    def extra_repr(self):
        return f"d={self.d}, n_tasks={self.n_tasks}, n_modules={self.n_modules}"


def _fp32_or_wider(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_hparams(d, n_tasks, n_modules):
    for name, v in (("d", d), ("n_tasks", n_tasks), ("n_modules", n_modules)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"MTCRL {name} must be an integer >= 1, got {v!r}")
    if d % n_modules != 0:
        raise ValueError(f"MTCRL splits d = {d} into n_modules = {n_modules} equal chunks, but "
                         f"{d} % {n_modules} != 0; pick n_modules that divides d")


def warmup_weight(step, total_steps, weight, warmup=0.3) -> float:
    """Invariance weight at `step`: 0 for the first `warmup` fraction of steps, `weight` after."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)
    if not is_int(total_steps) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    if not is_int(step) or not 0 <= step <= total_steps:
        raise ValueError(f"step must be an integer in [0, total_steps={total_steps}], got {step!r}")
    if not (isinstance(weight, (int, float)) and 0 <= weight < float("inf")):
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    if not (isinstance(warmup, (int, float)) and 0 <= warmup <= 1):
        raise ValueError(f"warmup is a fraction of training in [0, 1], got {warmup!r}")
    return 0.0 if step < warmup * total_steps else float(weight)
