"""Multi-head LoRA: a shared A and N heads B_i, routed (HydraLoRA) or router-free (M-LoRA).

HydraLoRA (Tian et al., NeurIPS 2024, arXiv 2404.19245) shares LoRA's down-projection A and
splits the up-projection into N heads that a per-token router mixes:

    h = W0 x + s * sum_i w_i B_i A drop(x),    w = softmax(W_r x),    s = alpha / r

A: r x d_in, kaiming_uniform(a=sqrt(5)); B_i: d_out x r, zero (step 0 equals the base model);
W_r: N x d_in, no bias. The router reads the un-dropped x; one fp32 softmax per token over all
heads (no top-k, no balancing loss, as in the authors' code). w depends on x: no merging.
Pitfall: while every B_i = 0 the router's gradient is exactly zero (dh/dw_i = s B_i A x = 0).

M-LoRA (router=False), the router-free multi-head of Align-LoRA's paper (Liu et al. 2025,
arXiv 2508.05078, sec. 3): the same A and heads, no router, no task ids:

    h = W0 x + s * mean_i B_i drop_i(A x)          (an independent dropout mask per head)

Without dropout (or in eval) that is exactly HydraLoRA with its router frozen at uniform 1/N,
and it merges: W = W0 + s * mean_i(B_i) A. The paper finds that the heads end up very similar
(`head_similarity` measures it) and that this variant beats the routed ones.

Trainable per layer: r*d_in + N*r*d_out (+ N*d_in router). Defaults r=4, N=3, alpha=32: the
HydraLoRA authors' (also Align-LoRA's baselines). Dtypes, fp32 merging, saving: as in lora.py.
Our choice: M-LoRA takes the mean of the heads (the paper says sum and mean in different places).
Our choice: M-LoRA heads start at zero and differ only through their dropout masks; with
  dropout=0 (our default, as in lora.py) all get the same gradient and stay identical (plain
  LoRA). The paper's alternative, random per-head B with that start subtracted from W0, is not
  implemented.
Our choice: routed dropout acts on x before A (as in LoRA); M-LoRA's per head on z = A x.
Our choice: routing weights are kept only inside `record_routing`; training pays nothing.
Our choice: head_similarity is nan for N = 1 or an all-zero head (cosine undefined).

Usage on any model built of nn.Linear layers (no edits to its code):

    import torch, multihead_lora as mh
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    mh.add_multihead_lora(model, targets=["0", "2"], n_heads=3)        # router=False: M-LoRA
    with mh.record_routing(model) as rec: model(torch.randn(8, 5, 16))  # rec["0"]: (8, 5, 3)
    torch.save(mh.multihead_state_dict(model), "adapter.pt")            # adapter tensors only
"""
import contextlib
import math

import torch
import torch.nn as nn


class MultiHeadLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int = 4, n_heads: int = 3, alpha: float = 32.0,
                 dropout: float = 0.0, router: bool = True):
        super().__init__()
        _check_hparams(r, n_heads, alpha, dropout)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"MultiHeadLoRALinear wraps an nn.Linear, got a {type(base).__name__}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        d_in, d_out, N = base.in_features, base.out_features, n_heads
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(d_in, r, bias=False, **kw)              # weight (r, d_in)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(N, d_out, r, **kw))      # B_i = lora_B[i]
        self.router = nn.Linear(d_in, N, bias=False, **kw) if router else None   # W_r (N, d_in)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.n_heads, self.alpha, self.scaling = r, N, alpha, alpha / r
        self.dropout, self.merged, self.record, self.last_weights = dropout, False, False, None

    def forward(self, x):                                    # x (..., d_in)
        if x.shape[-1] != self.base.in_features:
            raise ValueError(f"input's last dimension is {x.shape[-1]}, but this layer expects "
                             f"{self.base.in_features} features")
        out = self.base(x)                                   # (..., d_out)
        if self.merged:
            return out
        N, r = self.n_heads, self.r
        xa = x.to(self.lora_A.weight.dtype)                              # (..., d_in)
        out2 = out.reshape(-1, out.shape[-1])                             # (M, d_out), M tokens
        if self.router is None:
            z = self.lora_A(xa).reshape(-1, r)                            # (M, r)
            if not (self.training and self.dropout > 0):                  # no masks: mean_i(B_i) z
                B = self.lora_B.mean(0).t().to(out.dtype)                 # (r, d_out)
                return torch.addmm(out2, z.to(out.dtype), B, alpha=self.scaling).view(out.shape)
            wz = self.drop(z.unsqueeze(1).expand(-1, N, r))               # (M, N, r), mask per head
            s = self.scaling / N                                          # the mean's 1/N
        else:
            w = self.router(xa).float().softmax(-1).reshape(-1, N)        # (M, N), fp32
            if self.record:
                self.last_weights = w.detach().view(*x.shape[:-1], N)     # (..., N)
            z = self.lora_A(self.drop(xa)).reshape(-1, r)                 # (M, r)
            wz = w.unsqueeze(-1) * z.unsqueeze(1)                         # (M, N, r)
            s = self.scaling
        # sum_i B_i (w_i z) as one matmul over the stacked heads: (M, N*r) @ (N*r, d_out)
        B = self.lora_B.transpose(1, 2).reshape(N * r, -1).to(out.dtype)  # (N*r, d_out)
        h = torch.addmm(out2, wz.reshape(-1, N * r).to(out.dtype), B, alpha=s)
        return h.view(out.shape)

    def delta_weight(self):                                  # (d_out, d_in), fp32
        return self.scaling * (self.lora_B.float().mean(0) @ self.lora_A.weight.float())

    @torch.no_grad()
    def merge(self):
        if self.router is not None:
            raise ValueError("a routed (HydraLoRA) layer cannot be merged: its update s * sum_i "
                             "w_i(x) B_i A changes with the input through the router, so no "
                             "weight matrix equals it; keep it unmerged, or use router=False")
        if not self.merged:
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def extra_repr(self):
        return (f"r={self.r}, n_heads={self.n_heads}, alpha={self.alpha}, "
                f"router={self.router is not None}, merged={self.merged}")


def _check_hparams(r, n_heads, alpha, dropout):
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"multi-head LoRA rank r must be an integer >= 1, got {r!r}")
    if not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"multi-head LoRA n_heads must be an integer >= 1, got {n_heads!r}")
    if not alpha > 0:
        raise ValueError(f"multi-head LoRA alpha must be > 0 (scaling is alpha / r), got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"multi-head LoRA dropout must be in [0, 1), got {dropout!r}")


def _find_targets(model: nn.Module, targets):
    """Dotted names of the nn.Linear layers whose name ends with one of `targets` (peft-style)."""
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ValueError("targets is empty: name at least one linear layer, e.g. targets=['up']")
    modules = dict(model.named_modules())
    found, unmatched = [], set(targets)
    for name, mod in modules.items():
        hits = [t for t in targets if name == t or name.endswith("." + t)]
        if not hits:
            continue
        unmatched -= set(hits)
        parent = modules[name.rpartition(".")[0]]
        if isinstance(parent, nn.MultiheadAttention):
            raise ValueError(
                f"'{name}' belongs to nn.MultiheadAttention, which reads its weight directly "
                "instead of calling the layer, so an adapter there would silently do nothing. "
                "Target other layers (e.g. the feed-forward linear1/linear2).")
        if hasattr(mod, "lora_A"):
            raise ValueError(f"'{name}' is already adapted; build a fresh model to adapt it again")
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"target '{name}' is a {type(mod).__name__}, not an nn.Linear; "
                             "pick the linear layers inside it")
        found.append(name)
    if unmatched:
        linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        raise ValueError(f"targets {sorted(unmatched)} match no layer of the model; "
                         f"its nn.Linear layers are: {linears[:20]}")
    return found


def add_multihead_lora(model: nn.Module, targets=("q", "k", "v", "o", "up", "down"), r: int = 4,
                       n_heads: int = 3, alpha: float = 32.0, dropout: float = 0.0,
                       router: bool = True) -> list:
    """Wrap, in place, every nn.Linear whose dotted name ends with a target; freeze the rest."""
    _check_hparams(r, n_heads, alpha, dropout)
    names = _find_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, MultiHeadLoRALinear(getattr(parent, child), r, n_heads, alpha,
                                                   dropout, router))
        if isinstance(parent, nn.TransformerEncoderLayer):
            # its inference fast path reads linear1.weight itself and would skip the adapter;
            # any hook on a sub-module turns that path off
            getattr(parent, child).register_forward_pre_hook(_keep_off_fast_path)
    return names


def _keep_off_fast_path(module, args):
    return None


def multihead_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MultiHeadLoRALinear)]


def merge_multihead_lora(model: nn.Module):
    layers = multihead_layers(model)
    routed = [n for n, m in layers if m.router is not None]
    if routed:                                               # refuse before touching any weight
        raise ValueError(f"routed (HydraLoRA) layers {routed[:3]} cannot be merged: their update "
                         "depends on the input through the router; only router=False merges")
    for _, m in layers:
        m.merge()


def unmerge_multihead_lora(model: nn.Module):
    for _, m in multihead_layers(model):
        m.unmerge()


def multihead_state_dict(model: nn.Module) -> dict:
    """Only the adapter tensors (lora_A, lora_B, router), detached, ready for torch.save."""
    names = tuple(n + "." for n, _ in multihead_layers(model))
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.startswith(names) and k.endswith((".lora_A.weight", ".lora_B", ".router.weight"))}


def load_multihead_state_dict(model: nn.Module, state: dict):
    """Load tensors saved by multihead_state_dict into a model adapted with the same settings."""
    if any(m.merged for _, m in multihead_layers(model)):
        raise ValueError("the model has merged multi-head LoRA layers; "
                         "unmerge_multihead_lora(model) before loading")
    own = multihead_state_dict(model)
    if not own:
        raise ValueError("the model has no multi-head LoRA layers: call add_multihead_lora first")
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"adapter keys do not match this model: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}; were targets and router the same when saved?")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{k}: saved shape {tuple(v.shape)} != model's {tuple(own[k].shape)}"
                             " (were r and n_heads the same?)")
    model.load_state_dict(state, strict=False)


@torch.no_grad()
def head_similarity(model: nn.Module) -> dict:
    """Per layer, the mean off-diagonal cosine similarity between the flattened heads B_i.
    nan where it is undefined: N = 1, or some head is all zero (e.g. every head at init)."""
    sims = {}
    for name, m in multihead_layers(model):
        Bf = m.lora_B.float().reshape(m.n_heads, -1)         # (N, d_out * r)
        norms = Bf.norm(dim=1)                                # (N,)
        if m.n_heads < 2 or not bool((norms > 0).all()):
            sims[name] = float("nan")
            continue
        U = Bf / norms[:, None]
        C = U @ U.t()                                         # (N, N) cosines
        sims[name] = ((C.sum() - C.diagonal().sum()) / (m.n_heads * (m.n_heads - 1))).item()
    return sims


@contextlib.contextmanager
def record_routing(model: nn.Module):
    """Inside the block every routed layer keeps its routing weights; yields {name: (..., N)},
    filled by each forward pass (the last one wins). Outside it nothing is recorded."""
    layers = [(n, m) for n, m in multihead_layers(model) if m.router is not None]
    if not layers:
        raise ValueError("the model has no routed multi-head LoRA layers (router=True) to record")
    records, hooks = {}, []
    for name, m in layers:
        m.record = True
        hooks.append(m.register_forward_hook(
            lambda mod, args, out, name=name: records.__setitem__(name, mod.last_weights)))
    try:
        yield records
    finally:
        for h in hooks:
            h.remove()
        for _, m in layers:
            m.record, m.last_weights = False, None


def routing_table(records: dict, task_ids: torch.Tensor, n_tasks: int, mask=None) -> torch.Tensor:
    """(n_tasks, N): mean routing weight per task and head, over layers and masked tokens.
    records: {name: (B, ..., N)} from record_routing; task_ids (B,); mask (B, ...) bool or None.
    A task with no (unmasked) token gets a row of nan."""
    shapes = sorted({tuple(w.shape) for w in records.values()})
    if len(shapes) != 1:
        raise ValueError(f"records must be non-empty with one shape, got shapes {shapes}: fill "
                         "them in one forward inside `with record_routing(model) as records:`")
    W = torch.stack([w.float() for w in records.values()]).mean(0)   # (B, ..., N), over layers
    Bsz, N = W.shape[0], W.shape[-1]
    if not isinstance(n_tasks, int) or n_tasks < 1:
        raise ValueError(f"n_tasks must be an integer >= 1, got {n_tasks!r}")
    task_ids = torch.as_tensor(task_ids)
    if task_ids.dtype not in (torch.long, torch.int) or task_ids.shape != (Bsz,):
        raise ValueError(f"task_ids must be integers of shape ({Bsz},), one per sample, got "
                         f"{task_ids.dtype} {tuple(task_ids.shape)}")
    if Bsz and (int(task_ids.min()) < 0 or int(task_ids.max()) >= n_tasks):
        raise ValueError(f"task_ids must lie in [0, {n_tasks}), got values from "
                         f"{int(task_ids.min())} to {int(task_ids.max())}")
    mask = torch.ones(W.shape[:-1], dtype=torch.bool) if mask is None else mask
    if mask.dtype != torch.bool or mask.shape != W.shape[:-1]:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(W.shape[:-1])} (the records' "
                         f"shape without heads), got {mask.dtype} {tuple(mask.shape)}")
    W, mask = W.reshape(Bsz, -1, N), mask.reshape(Bsz, -1).to(W.device)    # (B, L, N), (B, L)
    t = task_ids.to(W.device).view(Bsz, 1).expand(mask.shape)[mask]         # (K,) kept tokens
    sums = W.new_zeros(n_tasks, N).index_add_(0, t, W[mask])                # (n_tasks, N)
    counts = torch.bincount(t, minlength=n_tasks).to(W.dtype)               # (n_tasks,)
    return sums / counts[:, None]
