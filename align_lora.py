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
integer (a tensor, a list or a numpy array, as the ids), real tokens where mask != 0 (HF's
attention_mask as is); without a mask every token counts, padding included. The authors take
statistics per sequence position over the samples and group the tasks by their position in the
batch (broken: their task sampler never reaches the trainer).

How it works: a forward hook on every sub-module named `lora_A` (lora.py's, multihead_lora.py's
and mtl_lora.py's layers) keeps its last output; the loss call uses and clears them. Call it
once per forward pass. Outputs are (B, ..., r) with the batch first, or (B*L, r) with a mask. A
copy of the model (copy.deepcopy, e.g. an EMA) keeps the hooks but they ignore its layers: build
another AlignmentLoss for the copy if it needs one; a saved model (torch.save(model)) loads with
hooks that do nothing. Under gradient checkpointing use use_reentrant=False: the reentrant kind
runs the forward without autograd, so the captured outputs could not train; the call refuses it.

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
- MMD is sum_xy C_xy k(x, y) over the draws, C from the tasks' pairs: one fused pass over the
  blocks of the distances on and above the diagonal sums the 19 kernels (with exp2) and keeps only
  C dk/dd for backward. A training step of train.py's default model (benchmarks/step_time.py)
  costs ~1.1x a LoRA step with KL and ~2.4x with MMD on a busy 2-core CPU (2.27x-2.55x in three
  runs, interleaved with LoRA; 3.3x-3.5x before the pass used exp2 and C), ~2.1x on one thread;
  19 separate kernels: ~9x. Lower max_tokens for less.
- Statistics in fp32 with autocast off; the loss is an fp32 scalar. Fewer than two tasks
  present give 0, still attached to the graph.
- A lora_A that runs twice in one forward pass contributes its last output.
"""
import math
import numbers
import weakref

import torch
import torch.nn as nn

KINDS = ("kl", "mmd")
# sigma_s, the authors' 19 bandwidths: each the variance in exp(-|x - y|^2 / (2 sigma_s))
BANDWIDTHS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0,
              100.0, 1e3, 1e4, 1e5, 1e6)
BLOCK = 65536      # on a CPU, d2 entries per block of the fused kernel sum (19 x 256 KiB)
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
        # W = [-beta_s / ln 2; 1; -2 beta_s], beta_s = 1 / (2 sigma_s): exp(-beta_s d^2) =
        # 2^(W[0] d^2), and W[1:] @ exp(-beta_s d^2) = [k; (dk/dd) / d]
        beta = [1 / (2 * s) for s in bandwidths]
        self._W = torch.tensor([[-b / math.log(2) for b in beta], [1.0] * len(beta),
                                [-2 * b for b in beta]])
        self._z = {}                                          # name -> last output (..., r)
        self._model, self._A = weakref.ref(model), [model.get_submodule(n) for n in self.names]
        self._handles = [A.register_forward_hook(_Capture(self._z, n, A))
                         for n, A in zip(self.names, self._A)]

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
        """L_align of the last forward pass. task_ids: (B,) integers, one per sample; mask: (B, L),
        bool or integer, real tokens where mask != 0 (HF's attention_mask works as is); each a
        tensor, a list or a numpy array. Without a mask every token counts, padding included."""
        zs = list(self._z.values())                           # use and clear (in place: a
        self._z.clear()                                       # compiled hook holds this dict)
        if not zs:
            raise ValueError(self._why_none_captured())
        if torch.is_grad_enabled() and not any(getattr(z, "requires_grad", True) for z in zs) \
                and any(p.requires_grad for A in self._A for p in A.parameters()):
            raise ValueError("the lora_A outputs carry no gradient, yet the adapters train: the "
                             "forward ran without autograd (torch.no_grad, or reentrant gradient "
                             "checkpointing); checkpoint with use_reentrant=False, e.g. peft's "
                             "prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs"
                             "={'use_reentrant': False})")
        ids = _tensor(task_ids, getattr(zs[0], "device", None))
        if not (ids is not None and ids.dtype in _INTS and ids.ndim == 1 and len(ids)):
            raise ValueError("task_ids must be integers of shape (B,), one per sample, B >= 1; got "
                             f"{task_ids!r:.60}")
        keep = mask if mask is None else _tensor(mask, ids.device)
        if mask is not None and not (keep is not None and keep.dtype in _INTS + (torch.bool,)):
            raise ValueError("mask must be bool or integers (B, L), real tokens where mask != 0 (a "
                             "tensor, a list or a numpy array); got "
                             f"{type(mask).__name__} {getattr(keep, 'dtype', '')}")
        shapes = [tuple(getattr(z, "shape", ())) for z in zs]   # (B, ..., r) or (B*L, r)
        keep = torch.ones(shapes[0][:-1], dtype=torch.bool, device=ids.device) if mask is None \
            else keep != 0
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

    def _why_none_captured(self):
        model = self._model()
        if not self._handles:
            return "no lora_A outputs: align.remove() removed the hooks; build a new AlignmentLoss"
        if model is None or not {id(A) for A in self._A} & {id(m) for m in model.modules()}:
            return ("the adapters are gone from the model (merge_and_unload_* put plain nn.Linear "
                    "layers back): nothing to align; align while the adapters train, before that")
        if all(getattr(m, "merged", False) for m in model.modules() if hasattr(m, "lora_A")):
            return "the adapters are merged, so lora_A does not run: unmerge_*(model) to train them"
        return "no lora_A outputs captured: run the model's forward pass first, once per loss call"

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
        # d = |x - y| by exact differences (equal tokens: exactly 0), the gradient through x
        # alone (the kernel's backward gives it for d_xy and d_yx): (Ly, m, m)
        d = torch.cdist(z, z.detach(), compute_mode="donot_use_mm_for_euclid_dist")
        # M_ij = mean of k over (draw of task i, draw of task j) = (U^T k U)_ij, U = onehot / n;
        # the mean over pairs of MMD^2_ij = M_ii + M_jj - 2 M_ij is sum_ij Lap_ij M_ij / pairs,
        # Lap the Laplacian of the graph of the pairs: L = sum_xy C_xy k_xy, C = U Lap U^T / pairs
        P = torch.triu(present[:, None] & present[None], diagonal=1).float()   # (T, T) pairs
        U, Q = onehot / n.clamp(min=1), P + P.t()                              # (m, T), (T, T)
        C = U @ (torch.diag(Q.sum(1)) - Q) @ U.t() / P.sum().clamp(min=1)      # (m, m)
        if self._W.device != d.device:                        # moved once, not every call
            self._W = self._W.to(d.device)
        # k(x, y) = sum_s exp(-|x - y|^2 / (2 sigma_s)); L, summed over the layers, by their number
        return _KernelSum.apply(d, C, self._W) / len(zs)


class _KernelSum(torch.autograd.Function):
    """sum over layers, x, y of C_xy k(d_xy), k(d) = sum_s exp(-beta_s d^2), for the distances d
    (Ly, m, m) (symmetric) and weights C (m, m), fused: one pass over the blocks of d on and above
    its diagonal gives k and dk/dd = -2 d sum_s beta_s exp(-beta_s d^2), and only C dk/dd is kept
    for backward (autograd would make 19 passes over d and keep every exponential). A block above
    the diagonal counts twice, its mirror image not at all. The gradient is for a d differentiated
    through its rows' tokens only: d_xy's plus d_yx's (the columns' share of d_xy is the rows' share
    of d_yx)."""

    @staticmethod
    def forward(ctx, d, C, W):                      # W (3, S) = [-beta_s / ln 2; 1; -2 beta_s]
        Ly, m, S = d.shape[0], d.shape[-1], W.shape[1]
        R = max(1, int((BLOCK / Ly) ** 0.5)) if d.device.type == "cpu" else m    # block side
        kg = d.new_zeros(2, *d.shape)                     # [k; (dk/dd) / d]: (2, Ly, m, m)
        buf = d.new_empty(S * Ly * min(R, m) ** 2)
        for a in range(0, m, R):
            for b in range(a, m, R):
                d2 = d[:, a:a + R, b:b + R].square()      # (Ly, R, R)
                e = buf[:S * d2.numel()].view(S, *d2.shape)
                # exp(-beta_s d2) = 2^(-beta_s d2 / ln 2): on a CPU, float32's exp2 is ~3x faster
                # than its exp, as exact, and keeps its speed where it underflows (exp gets
                # several times slower below -87): (S, Ly, R, R)
                torch.mul(W[0].view(S, 1, 1, 1), d2, out=e).exp2_()
                # [k; (dk/dd) / d] = [sum_s e_s; -2 sum_s beta_s e_s]: (2, Ly, R, R)
                kg[:, :, a:a + R, b:b + R] = (W[1:] @ e.view(S, -1)).view(2, *d2.shape)
        # C weighted 2 above the diagonal blocks, 1 on them, 0 below: (m, m)
        blk = torch.arange(m, device=d.device) // R
        C = C * ((blk[:, None] <= blk[None]).to(C.dtype) + (blk[:, None] < blk[None]).to(C.dtype))
        ctx.save_for_backward(kg[1].mul_(d).mul_(C))      # C dk/dd: (Ly, m, m)
        return torch.mv(kg[0].view(Ly, -1), C.view(-1)).sum()

    @staticmethod
    def backward(ctx, grad):
        Cg, = ctx.saved_tensors
        return (Cg + Cg.mT).mul_(grad), None, None


class _Capture:
    """The forward hook on one lora_A: keeps its last output. A copy of the model (copy.deepcopy)
    shares the hook, which skips the copy's layer; a pickled model (torch.save(model)) gets a
    hook that does nothing (build a new AlignmentLoss for a loaded model)."""

    def __init__(self, store, name, target):
        self.store, self.name, self.target = store, name, target

    def __call__(self, module, inputs, output):
        if module is self.target:
            self.store[self.name] = output                    # overwrites: nothing kept over steps

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return _Capture, ({}, self.name, None)


def _tensor(x, device):                 # a tensor, list or numpy array as a tensor, else None
    try:
        return torch.as_tensor(x, device=device)
    except (TypeError, ValueError, RuntimeError):
        return None


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
