"""Align-LoRA: align the tasks inside one shared LoRA (Liu et al. 2025, arXiv 2508.05078).

The paper finds that the heads of multi-head LoRA end up highly similar and that a plain
router-free variant beats the routed ones; so it keeps one standard LoRA and trains it with

    L = L_task + lambda * L_align

where L_align makes the outputs of the down-projection, z = A drop(x) (before B, before the
scaling), look alike across the tasks of the batch, in every adapted layer. It adds no parameters
and the adapter merges like any LoRA. The gradient of L_align reaches adapters only: every A, and
the B of a layer only through the inputs of later adapted layers.

KL (kind="kl", default, the paper's best): each task t's z is a diagonal Gaussian N(mu_t, var_t),
v_t = var_t + eps; every pair (i, j) of tasks present in the batch pays the symmetric KL

    1/2 [KL(p_i||p_j) + KL(p_j||p_i)]
        = 1/4 sum_d [ v_i/v_j + v_j/v_i + (mu_i - mu_j)^2 (1/v_i + 1/v_j) - 2 ]

averaged over the pairs, then over the layers.
MMD (kind="mmd"): squared maximum mean discrepancy between the tasks' samples of z with the kernel
k(x, y) = sum_s exp(-|x - y|^2 / (2 s)) over 19 bandwidths s; MMD^2_ij = M_ii + M_jj - 2 M_ij with
M_ij the mean of k over (token of task i, token of task j); averaged over pairs, then layers.

Defaults (authors): lambda = 0.2 (swept 0.01-0.5), eps = 1e-8, kind "kl"; LoRA r=8, alpha=32,
dropout 0.1 on the MLP layers. lambda is the caller's: `loss = task_loss + 0.2 * align(ids, mask)`.

How tokens are pooled: every real token of a task's samples is one draw from that task's
distribution, so z (B, L, r) and its mask (B, L) become one bag of tokens per task, padding left
out. The authors' code takes statistics per sequence position over the samples and groups tasks
by their position in the batch; we take explicit per-sample task ids (a batch may mix tasks in
any order) and pool over positions, which gives a task many draws even with few samples in the
batch, and compares what the tasks' tokens look like rather than what sits at position p.

How it works: a forward hook on every sub-module named `lora_A` (lora.py's LoRALinear, and the
multi-head and MTL-LoRA layers) keeps that module's last output, graph included; calling the
loss uses and clears them. Call it once per forward pass. The batch must be dim 0 of the layers'
inputs: outputs (B, L, r), (B, r) or (B, ..., r); a layer that flattens its tokens to (B*L, r)
(row-major) is read as (B, L, r) when the mask (B, L) is given.

- Our choice: unbiased variance (divide by n_t - 1); a task is present with >= 2 real tokens
  (for MMD: in the subsample).
- Our choice: KL keeps the sum over d of the equation (it grows with r: divide lambda by r to
  compare ranks); the layers are concatenated along d, so all of them cost one pass.
- Our choice: MMD bandwidths are 19 values log-spaced from 1e-6 to 1e6, each entering as the
  variance s in exp(-|x - y|^2 / (2 s)); the biased V-statistic (>= 0, exactly 0 for equal samples).
- Our choice: MMD uses at most max_tokens (512) real tokens per call, drawn uniformly with torch's
  RNG (the same tokens in every layer); KL uses every token. Cost: KL adds ~5% to a LoRA step of
  a tiny GPT; MMD's 19 kernels of (layers, m, m) are cheap on a GPU but ~10x a step on a CPU
  (lower max_tokens there).
- Our choice: statistics in fp32 with autocast off; the loss is an fp32 scalar.
- Our choice: task ids are checked on every call (one host-device sync); a batch with fewer than
  two tasks present gives 0 (still attached to the graph, so backward() works).
- Our choice: a lora_A that runs twice in one forward pass contributes its last output.

Usage (with lora.py's adapters; any module with `lora_A` sub-modules works):

    import torch, lora, align_lora
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    lora.add_lora(model, targets=["0", "2"], r=4)
    align = align_lora.AlignmentLoss(model)                   # hooks every lora_A; align.remove()
    x, task_ids = torch.randn(8, 5, 16), torch.arange(8) % 2  # 8 sequences of 5 tokens, 2 tasks
    (model(x).square().mean() + 0.2 * align(task_ids)).backward()   # L_task + lambda * L_align
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("kl", "mmd")
BANDWIDTHS = tuple(10.0 ** (k / 1.5) for k in range(-9, 10))   # 19 values, 1e-6 .. 1e6


class AlignmentLoss:
    def __init__(self, model: nn.Module, kind: str = "kl", eps: float = 1e-8,
                 max_tokens: int = 512, bandwidths=BANDWIDTHS):
        if kind not in KINDS:
            raise ValueError(f"alignment kind must be one of {KINDS}, got {kind!r}")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps must be > 0 (it keeps the variances away from 0), got {eps!r}")
        if not isinstance(max_tokens, int) or max_tokens < 2:
            raise ValueError(f"max_tokens must be an integer >= 2, got {max_tokens!r}")
        bandwidths = tuple(bandwidths)
        if not bandwidths or not all(isinstance(s, (int, float)) and s > 0 for s in bandwidths):
            raise ValueError(f"bandwidths must be positive numbers, got {bandwidths!r}")
        names = [n for n, _ in model.named_modules() if n.rpartition(".")[2] == "lora_A"]
        if not names:
            raise ValueError("the model has no sub-module named 'lora_A': add adapters first, "
                             "e.g. lora.add_lora(model, targets=[...]), then build AlignmentLoss")
        self.kind, self.eps, self.max_tokens = kind, float(eps), max_tokens
        self.betas = [1.0 / (2.0 * s) for s in bandwidths]
        self.names = names
        self._z = {}                                         # name -> last output (..., r)
        self._handles = [model.get_submodule(n).register_forward_hook(self._capture(n))
                         for n in names]

    def _capture(self, name):
        def hook(module, inputs, output):
            self._z[name] = output                           # overwrites: nothing kept across steps
        return hook

    def remove(self):
        """Remove every hook and drop captured outputs (calling it twice is fine)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._z = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        return (f"AlignmentLoss(kind={self.kind!r}, layers={len(self.names)}, "
                f"active={bool(self._handles)})")

    def __call__(self, task_ids: torch.Tensor, mask: torch.Tensor = None) -> torch.Tensor:
        zs, self._z = list(self._z.values()), {}             # use and clear
        if not zs:
            why = "" if self._handles else " (the hooks were removed: build a new AlignmentLoss)"
            raise ValueError("no lora_A outputs captured: run the model's forward pass first, "
                             f"then call the loss once per forward{why}")
        for z in zs:
            if not isinstance(z, torch.Tensor):
                raise ValueError(f"a lora_A module returned a {type(z).__name__}, not a tensor; "
                                 "AlignmentLoss needs lora_A to be a plain linear layer")
        ids, T = _check_ids(task_ids, zs[0].device)          # (B,), number of task ids
        B = len(ids)
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool):
            raise ValueError("mask must be a bool tensor (B, L), True on real tokens (e.g. "
                             f"idx != PAD), got {getattr(mask, 'dtype', type(mask).__name__)}")
        zs, L = _as_tokens(zs, B, mask)                      # each (B, L, r)
        if mask is None:
            mask = torch.ones(B, L, dtype=torch.bool, device=ids.device)
        if mask.dim() == 0 or mask.shape[0] != B or mask.numel() != B * L:
            raise ValueError(f"mask must have shape ({B}, {L}), one entry per token the lora_A "
                             f"layers saw, got {tuple(mask.shape)}")
        keep = mask.to(ids.device).reshape(-1)               # (N,) real tokens, N = B * L
        t = ids[:, None].expand(B, L).reshape(-1)            # (N,) task of each token
        with torch.autocast(zs[0].device.type, enabled=False):
            if self.kind == "kl":
                return self._kl(zs, t, keep, T)
            return self._mmd(zs, t, keep, T)

    def _kl(self, zs, t, keep, T):
        N = len(t)
        z = torch.cat([z.reshape(N, -1) for z in zs], -1).float()         # (N, D): all layers' d
        z = torch.where(keep[:, None], z, 0.0)               # padding may hold anything, even inf
        O = F.one_hot(t, T).float() * keep[:, None]          # (N, T) token -> task, padding 0
        n = O.sum(0)                                         # (T,) real tokens per task
        mu = (O.t() @ z) / n.clamp(min=1)[:, None]           # (T, D)
        var = (O.t() @ (z - mu[t]).square()) / (n - 1).clamp(min=1)[:, None]   # (T, D) unbiased
        present = n >= 2
        mu = torch.where(present[:, None], mu, 0.0)          # absent tasks: harmless finite values
        v = torch.where(present[:, None], var, 1.0) + self.eps
        vi, vj = v[:, None], v[None]                         # (T, 1, D), (1, T, D)
        dm2 = (mu[:, None] - mu[None]).square()              # (T, T, D)
        kl = 0.25 * (vi / vj + vj / vi + dm2 * (1 / vi + 1 / vj) - 2).sum(-1)   # (T, T)
        return _mean_over_pairs(kl, present) / len(zs)       # sum over all d / layers = layer mean

    def _mmd(self, zs, t, keep, T):
        N = len(t)
        idx = None
        if N > self.max_tokens:                              # real tokens first, in random order
            key = torch.rand(N, device=t.device) + (~keep).float()
            idx = key.topk(self.max_tokens, largest=False).indices   # (m,)
            t, keep = t[idx], keep[idx]
        O = F.one_hot(t, T).float() * keep[:, None]          # (m, T)
        n = O.sum(0)                                         # (T,)
        present = n >= 2
        groups = {}                                          # layers of equal rank go together
        for z in zs:
            groups.setdefault(z.shape[-1], []).append(z.reshape(N, -1))
        total = 0.0
        for group in groups.values():
            z = torch.stack(group).float()                   # (Ly, N, r)
            if idx is not None:
                z = z[:, idx]                                # (Ly, m, r)
            z = torch.where(keep[:, None], z, 0.0)
            d2 = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist").square()
            # (Ly, m, m): exact differences, so equal tokens are at distance exactly 0
            K = sum(torch.exp(-b * d2) for b in self.betas)  # (Ly, m, m)
            M = O.t() @ K @ O / (n[:, None] * n[None]).clamp(min=1)   # (Ly, T, T) mean kernel
            Md = M.diagonal(dim1=1, dim2=2)                  # (Ly, T)
            total = total + (Md[:, :, None] + Md[:, None] - 2 * M).sum(0)   # (T, T) MMD^2 summed
        return _mean_over_pairs(total, present) / len(zs)


def _mean_over_pairs(D, present):
    """Mean of D[i, j] over pairs i < j of present tasks; 0 (attached to the graph) if none."""
    pairs = torch.triu(present[:, None] & present[None], diagonal=1)   # (T, T)
    return (D * pairs).sum() / pairs.sum().clamp(min=1)


def _check_ids(task_ids, device):
    if not isinstance(task_ids, torch.Tensor) or task_ids.dtype == torch.bool or \
            task_ids.is_floating_point() or task_ids.is_complex():
        raise ValueError("task_ids must be an integer tensor (B,) of per-sample task ids, got "
                         f"{getattr(task_ids, 'dtype', type(task_ids).__name__)}")
    if task_ids.dim() != 1 or len(task_ids) == 0:
        raise ValueError("task_ids must have shape (B,), one id per sample, B >= 1; got shape "
                         f"{tuple(task_ids.shape)}")
    ids = task_ids.to(device).long()
    lo, hi = torch.stack(ids.aminmax()).tolist()             # the one host-device sync
    if lo < 0:
        raise ValueError(f"task ids must be >= 0, got {lo}")
    return ids, hi + 1


def _as_tokens(zs, B, mask):
    """Each output as (B, L, r): batch-first (B, ..., r), or flat (B*L, r) with a (B, L) mask."""
    out = []
    for z in zs:
        flat = (mask is not None and z.dim() == 2 and mask.dim() == 2 and mask.shape[0] == B
                and z.shape[0] == mask.numel())
        if not (z.dim() >= 2 and z.shape[0] == B or flat):
            raise ValueError(f"a lora_A output of shape {tuple(z.shape)} does not fit {B} task "
                             "ids: give one id per sample of the batch the model just ran (the "
                             "batch must be dim 0 of the layers' inputs; a layer that flattens "
                             "its tokens to (B*L, r) also needs the mask (B, L))")
        out.append(z.reshape(B, -1, z.shape[-1]))
    L = out[0].shape[1]
    for z in out:
        if z.shape[1] != L:
            raise ValueError(f"lora_A outputs disagree on the number of tokens per sample: {L} vs "
                             f"{z.shape[1]}; every adapted layer must see the same tokens")
    return out, L
