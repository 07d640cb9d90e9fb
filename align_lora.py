"""Align-LoRA: align the tasks inside one shared LoRA (Liu et al. 2025, arXiv 2508.05078).

The paper finds that the heads of multi-head LoRA end up highly similar and that a plain
router-free variant beats the routed ones; so it keeps one standard LoRA and trains it with

    L = L_task + lambda * L_align,   L_align = mean over task pairs (i, j) and adapted layers of
                                               D(z of task i, z of task j)

where z = A drop(x) is the down-projection's output (before B and the scaling). It adds no
parameters and merges like any LoRA. The gradient of L_align reaches adapters only: every A, and
the B of a layer only through the inputs of later adapted layers.
- kind="kl" (default, the paper's best): task t's z is a diagonal Gaussian N(mu_t, var_t),
  v_t = var_t + eps, and D is the symmetric KL
      1/2 [KL(p_i||p_j) + KL(p_j||p_i)] = 1/4 sum_d [ v_i/v_j + v_j/v_i
                                             + (mu_i - mu_j)^2 (1/v_i + 1/v_j) - 2 ]
- kind="mmd": D is the squared maximum mean discrepancy MMD^2_ij = M_ii + M_jj - 2 M_ij, M_ij the
  mean of k(x, y) = sum_s exp(-|x - y|^2 / (2 sigma_s)) over (token of task i, token of task j).

Defaults (authors): lambda = 0.2 (swept 0.01-0.5), eps = 1e-8, kind "kl", the 19 bandwidths
sigma_s of BANDWIDTHS; LoRA r=8, alpha=32, dropout 0.1 on the MLP layers. lambda is the caller's:
`loss = task_loss + 0.2 * align(ids, mask)`. Note: the authors' released trainer
(github.com/jinda-liu/Align-LoRA) adds lambda * L_align once per 10 accumulated micro-batches,
an effective weight of lambda/10 against the mean task loss; 0.2 here weighs it every step.

How tokens are pooled: every real token of a task's samples is one draw from that task's
distribution; z (B, L, r) and the mask (B, L) become one bag of tokens per task, padding left out,
with explicit per-sample task ids (a batch may mix tasks in any order). The mask is bool or
integer, real tokens where mask != 0 (HF's attention_mask as is); without a mask every token
counts, padding included. The authors take statistics per sequence position over the samples and
group the tasks by their position in the batch (broken: their task sampler never reaches the
trainer).

How it works: a forward hook on every sub-module named `lora_A` (lora.py's, multihead_lora.py's
and mtl_lora.py's layers) keeps its last output; the loss call uses and clears them. Call it
once per forward pass. Outputs are (B, ..., r) with the batch first, or (B*L, r) with a mask. A
copy of the model (copy.deepcopy, e.g. an EMA) keeps the hooks but they ignore its layers: build
another AlignmentLoss for the copy if it needs one.

Usage (with lora.py's adapters; any module with `lora_A` sub-modules works):

    import torch, lora, align_lora
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    lora.add_lora(model, targets=["0", "2"], r=4)
    align = align_lora.AlignmentLoss(model, n_tasks=2)        # hooks every lora_A; align.remove()
    x, task_ids = torch.randn(8, 5, 16), torch.arange(8) % 2  # 8 sequences of 5 tokens, 2 tasks
    (model(x).square().mean() + 0.2 * align(task_ids)).backward()   # L_task + lambda * L_align

Our choices:
- n_tasks is fixed at construction and sizes the per-task statistics; ids outside [0, n_tasks)
  stop the call through a device-side assert (no value is read back to the host).
- Unbiased variance (n_t - 1); a task counts when it has >= 2 real tokens (MMD: drawn tokens).
- KL sums over d (it grows with r: divide lambda by r to compare ranks).
- MMD: the biased V-statistic (>= 0, exactly 0 for equal samples), on at most max_tokens (512)
  real tokens per call drawn with torch's RNG (the same ones in every layer); KL uses every token.
- MMD sums its 19 kernels in one fused pass over d2 and keeps only dk/dd2 for backward. A
  training step of train.py's default model on a CPU costs ~1.05x a LoRA step with KL and ~2.3x
  with MMD (19 separate kernels: ~9x); lower max_tokens there.
- Statistics in fp32 with autocast off; the loss is an fp32 scalar. Fewer than two tasks
  present give 0, still attached to the graph.
- A lora_A that runs twice in one forward pass contributes its last output.
"""
import math
import numbers

import torch
import torch.nn as nn

KINDS = ("kl", "mmd")
# sigma_s, the authors' 19 bandwidths: each the variance in exp(-|x - y|^2 / (2 sigma_s))
BANDWIDTHS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0,
              100.0, 1e3, 1e4, 1e5, 1e6)
BLOCK = 32768      # on a CPU, d2 entries per block of the fused kernel sum (19 x 128 KiB in cache)
_INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class AlignmentLoss:
    def __init__(self, model: nn.Module, n_tasks: int, kind: str = "kl", eps: float = 1e-8,
                 max_tokens: int = 512, bandwidths=BANDWIDTHS):
        bandwidths = tuple(bandwidths)
        if not (kind in KINDS and bandwidths and all(_num(x) for x in (eps, *bandwidths))
                and all(isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 2
                        for x in (n_tasks, max_tokens))):
            raise ValueError(f"AlignmentLoss needs n_tasks, max_tokens integers >= 2, kind in "
                             f"{KINDS}, eps, bandwidths in (0, 1e30); got {n_tasks=}, {kind=}, "
                             f"{eps=}, {max_tokens=}, bandwidths={bandwidths}")
        n_tasks, max_tokens = int(n_tasks), int(max_tokens)
        self.names = [n for n, _ in model.named_modules() if n.rpartition(".")[2] == "lora_A"]
        if not self.names:
            raise ValueError("the model has no sub-module named 'lora_A': add adapters first, "
                             "e.g. lora.add_lora(model, targets=[...]), then build AlignmentLoss")
        self.n_tasks, self.kind, self.eps, self.max_tokens = n_tasks, kind, float(eps), max_tokens
        # W = [1; -beta_s], beta_s = 1 / (2 sigma_s): W @ exp(-beta_s d2) = [k; dk/dd2]
        self._W = torch.tensor([[1.0] * len(bandwidths), [-1 / (2 * s) for s in bandwidths]])
        self._z = {}                                          # name -> last output (..., r)
        self._handles = [model.get_submodule(n).register_forward_hook(self._capture(n, m))
                         for n in self.names for m in [model.get_submodule(n)]]

    def _capture(self, name, target):
        def hook(module, inputs, output):
            if module is target:              # not a copy's (a deepcopy of the model shares hooks)
                self._z[name] = output                        # overwrites: nothing kept over steps
        return hook

    def remove(self):
        """Remove every hook and drop captured outputs (calling it twice is fine)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._z.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        return (f"AlignmentLoss(n_tasks={self.n_tasks}, kind={self.kind!r}, "
                f"layers={len(self.names)}, active={bool(self._handles)})")

    def __call__(self, task_ids, mask=None) -> torch.Tensor:
        """L_align of the last forward pass. task_ids: (B,) integers, one per sample (a tensor or a
        list); mask: (B, L), bool or integer, real tokens where mask != 0 (HF's attention_mask
        works as is). Without a mask every token counts, padding included."""
        zs = list(self._z.values())                           # use and clear (in place: a
        self._z.clear()                                       # compiled hook holds this dict)
        if not zs:
            raise ValueError("no lora_A outputs captured: run the model's forward pass first, "
                             "once per loss call (after align.remove(), build a new AlignmentLoss)")
        try:
            ids = torch.as_tensor(task_ids, device=getattr(zs[0], "device", None))
        except (TypeError, ValueError, RuntimeError):
            ids = torch.empty(0)
        if not (ids.dtype in _INTS and ids.ndim == 1 and len(ids)):
            raise ValueError("task_ids must be integers of shape (B,), one per sample, B >= 1; got "
                             f"{task_ids!r:.60}")
        if mask is not None and not (torch.is_tensor(mask) and mask.dtype in _INTS + (torch.bool,)):
            raise ValueError(f"mask must be a bool or integer tensor (B, L), real tokens where "
                             f"mask != 0; got {getattr(mask, 'dtype', type(mask).__name__)}")
        shapes = [tuple(getattr(z, "shape", ())) for z in zs]   # (B, ..., r) or (B*L, r)
        keep = torch.ones(shapes[0][:-1], dtype=torch.bool, device=ids.device) if mask is None \
            else mask != 0
        B, N = len(ids), keep.numel()                         # N = B * L tokens
        if not (keep.dim() and len(keep) == B and all(
                len(s) >= 2 and s[0] in (B, N) and math.prod(s) == N * s[-1] for s in shapes)):
            raise ValueError(f"lora_A outputs of shapes {shapes[:3]} do not fit {B} task ids and a "
                             f"mask of shape {tuple(keep.shape)}: the outputs must be tensors "
                             "(B, ..., r), or (B*L, r) with a mask (B, L), one L for all layers")
        ids, T = ids.long(), self.n_tasks                     # (B,)
        torch._assert_async(((ids >= 0) & (ids < T)).all(), f"task ids must be in [0, n_tasks={T})")
        zs = [z.reshape(B, -1, z.shape[-1]) for z in zs]      # each (B, L, r)
        keep = keep.to(ids.device).reshape(-1)                # (N,) real tokens
        t = ids[:, None].expand(B, N // B).reshape(-1)        # (N,) task of each token
        with torch.autocast(zs[0].device.type, enabled=False):
            return (self._kl if self.kind == "kl" else self._mmd)(zs, t, keep)

    def _kl(self, zs, t, keep):
        N = len(t)
        # z: all layers' down-projections side by side, padding zeroed (it may hold inf): (N, D)
        z = torch.cat([z.reshape(N, -1) for z in zs], -1).float()
        z = torch.where(keep[:, None], z, 0.0)
        onehot, n, present = _tasks_of(t, keep, self.n_tasks)   # (N, T), (T,), (T,)
        # mu_t = 1/n_t sum_{tokens of t} z: (T, D)
        mu_t = onehot.t() @ z / n.clamp(min=1)[:, None]
        # var_t = 1/(n_t - 1) sum_{tokens of t} (z - mu_t)^2: (T, D)
        var_t = onehot.t() @ (z - onehot @ mu_t).square() / (n - 1).clamp(min=1)[:, None]
        # v_t = var_t + eps (absent tasks: any finite value, they take part in no pair): (T, D)
        v_t = torch.where(present[:, None], var_t, 1.0) + self.eps
        mu_t = torch.where(present[:, None], mu_t, 0.0)
        mu_i, mu_j, v_i, v_j = mu_t[:, None], mu_t[None], v_t[:, None], v_t[None]
        # 1/4 sum_d [v_i/v_j + v_j/v_i + (mu_i - mu_j)^2 (1/v_i + 1/v_j) - 2]: (T, T)
        kl = 0.25 * (v_i / v_j + v_j / v_i + (mu_i - mu_j) ** 2 * (1 / v_i + 1 / v_j) - 2).sum(-1)
        # mean over pairs; the sum over all layers' d divided by their number = mean over layers
        return _mean_over_pairs(kl, present) / len(zs)

    def _mmd(self, zs, t, keep):
        N, r = len(t), max(z.shape[-1] for z in zs)
        draw = slice(None)                                    # m = N draws: every token
        if N > self.max_tokens:
            # m = max_tokens draws, real tokens first, in random order: (m,)
            key = torch.rand(N, device=t.device) + (~keep).float()
            draw = key.topk(self.max_tokens, largest=False).indices
        t, keep = t[draw], keep[draw]                         # (m,) each
        # z: each layer's draws, zero-padded to the largest r (distances do not change): (Ly, m, r)
        z = torch.stack([nn.functional.pad(z.reshape(N, -1)[draw], (0, r - z.shape[-1]))
                         for z in zs]).float()
        z = torch.where(keep[:, None], z, 0.0)
        onehot, n, present = _tasks_of(t, keep, self.n_tasks)   # (m, T), (T,), (T,)
        # d2 = |x - y|^2 by exact differences (equal tokens: exactly 0): (Ly, m, m)
        d2 = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist").square()
        # k(x, y) = sum_s exp(-d2 / (2 sigma_s)): (Ly, m, m)
        if self._W.device != d2.device:                       # moved once, not every call
            self._W = self._W.to(d2.device)
        k = _KernelSum.apply(d2, self._W)
        # M_ij = mean of k over (draw of task i, draw of task j): (Ly, T, T)
        M = onehot.t() @ (k @ onehot) / (n[:, None] * n[None]).clamp(min=1)
        M_ii = M.diagonal(dim1=1, dim2=2)                     # (Ly, T)
        # MMD^2_ij = M_ii + M_jj - 2 M_ij, summed over layers: (T, T)
        mmd2 = (M_ii[:, :, None] + M_ii[:, None] - 2 * M).sum(0)
        return _mean_over_pairs(mmd2, present) / len(zs)


class _KernelSum(torch.autograd.Function):
    """k = sum_s exp(-beta_s d2) of a symmetric d2 (Ly, m, m), fused: one pass over the blocks on
    and above its diagonal gives k and dk/dd2 = -sum_s beta_s exp(-beta_s d2), and only dk/dd2 is
    kept for backward (autograd would make 19 passes over d2 and keep every exp(-beta_s d2))."""

    @staticmethod
    def forward(ctx, d2, W):                                  # W (2, S) = [1; -beta_s]
        Ly, m, S = d2.shape[0], d2.shape[-1], W.shape[1]
        R = max(1, int((BLOCK / Ly) ** 0.5)) if d2.device.type == "cpu" else m   # block side
        kg = d2.new_empty(2, *d2.shape)                       # [k; dk/dd2]: (2, Ly, m, m)
        for a in range(0, m, R):
            for b in range(a, m, R):
                x = d2[:, a:a + R, b:b + R]                   # (Ly, R, R)
                # exp(-beta_s d2), the exponent clamped at -80 (exp(-80) ~ 2e-35; below it,
                # float32's exp leaves its fast path and gets several times slower): (S, Ly R R)
                e = (W[1][:, None] * x.reshape(1, -1)).clamp_(min=-80.0).exp_()
                # [k; dk/dd2] = [sum_s e_s; -sum_s beta_s e_s] = W e: (2, Ly, R, R)
                kg[:, :, a:a + R, b:b + R] = blk = (W @ e).view(2, *x.shape)
                kg[:, :, b:b + R, a:a + R] = blk.transpose(-1, -2)   # d2 is symmetric
        ctx.save_for_backward(kg[1])
        return kg[0]

    @staticmethod
    def backward(ctx, grad_k):
        g, = ctx.saved_tensors
        return grad_k * g, None


def _num(x):
    return isinstance(x, (int, float)) and 0 < x < 1e30      # > 0 and finite, NaN refused


def _tasks_of(t, keep, T):
    """One-hot (N, T) of each real token's task (padding: 0), tokens per task, present (>= 2)."""
    onehot = ((t[:, None] == torch.arange(T, device=t.device)) & keep[:, None]).float()
    n = onehot.sum(0)
    return onehot, n, n >= 2


def _mean_over_pairs(D, present):
    """Mean of D[i, j] over pairs i < j of present tasks; 0 (attached to the graph) if none."""
    pairs = torch.triu(present[:, None] & present[None], diagonal=1)   # (T, T)
    return (D * pairs).sum() / pairs.sum().clamp(min=1)
