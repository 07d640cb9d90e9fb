"""Multi-head LoRA: a shared A and N heads B_i, routed (HydraLoRA) or router-free (M-LoRA).

HydraLoRA (Tian et al., NeurIPS 2024, arXiv 2404.19245) shares LoRA's down-projection A and
splits the up-projection into N heads that a per-token router mixes:

    h = W0 x + s * sum_i w_i B_i A drop(x),    w = softmax(W_r x),    s = alpha / r

A: r x d_in, kaiming_uniform(a=sqrt(5)); B_i: d_out x r, zero (step 0 equals the base model);
W_r: N x d_in, no bias, nn.Linear's init. The router reads the un-dropped x; one fp32 softmax per
token over all heads (no top-k, no balancing loss, as in the authors' code). w depends on x: no
merging. Pitfall: while every B_i = 0 the router's gradient is exactly zero (dh/dw_i = s B_i A x).

M-LoRA (router=False), the router-free multi-head of Align-LoRA's paper (Liu et al. 2025,
arXiv 2508.05078, sec. 3): the same A and heads, no router, no task ids, a dropout mask per head:

    h = W0 x + s * mean_i B_i drop_i(A x)   [ - s * B0 A0 x   with init="offset" ]

In eval (or without dropout) that is HydraLoRA with its router frozen at 1/N, and it merges:
W = W0 + s * (mean_i(B_i) A - B0 A0). The paper finds that the heads end up very similar
(`head_similarity` measures it) and that this variant beats the routed ones. Two inits:
- init="zero" (default): every B_i = 0, as in HydraLoRA: no extra buffers or compute, and the
  start is exactly the base, in train mode too; the heads then differ only through their dropout
  masks (with dropout 0 they get equal gradients and stay identical: plain LoRA).
- init="offset" (the Align-LoRA authors' R-LoRA code): random B_i, so the heads differ from the
  start; A0 = A and B0 = mean_i B_i at init are kept as frozen buffers and s * B0 A0 x is
  subtracted (one more rank-r product per forward), so step 0 is the base.

Trainable per layer: r*d_in + N*r*d_out (+ N*d_in router). Defaults r=4, alpha=32: the HydraLoRA
authors' script (which uses N=4 heads, `lora_b_nums=4`); n_heads=3 is the Align-LoRA paper's
baseline (its parameter figures use N=3); dropout 0 as in lora.py (HydraLoRA's script uses 0.05,
the Align-LoRA authors' 0.1).

Usage on any model built of nn.Linear layers (no edits to its code):

    import torch, multihead_lora as mh
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    mh.add_multihead_lora(model, targets=["0"], n_heads=3)             # router=True: HydraLoRA
    mh.add_multihead_lora(model, targets=["2"], router=False, init="offset")         # M-LoRA
    with mh.record_routing(model) as w: model(torch.randn(8, 5, 16))   # w["0"]: (8, 5, 3)
    torch.save(mh.multihead_state_dict(model), "adapter.pt")           # adapter tensors only

Our choices and the limits of this file are listed at its end.
"""
import contextlib
import math
import numbers
import warnings

import torch
import torch.nn as nn


class MultiHeadLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int = 4, n_heads: int = 3, alpha: float = 32.0,
                 dropout: float = 0.0, router: bool = True, init: str = "zero",
                 fp32_adapter: bool = True):
        super().__init__()
        _check_hparams(base, r, n_heads, alpha, dropout, router, init)
        kw = dict(device=base.weight.device, dtype=_adapter_dtype(base, fp32_adapter))
        self.base = base.requires_grad_(False)                           # W0, frozen
        d_in, d_out, N = base.in_features, base.out_features, n_heads
        self.lora_A = nn.Linear(d_in, r, bias=False, **kw)               # A: (r, d_in)
        self.lora_B = nn.Parameter(torch.empty(N, d_out, r, **kw))       # B_i = lora_B[i]
        self.router = nn.Linear(d_in, N, bias=False, **kw) if router else None   # W_r: (N, d_in)
        offset = init == "offset"                                        # the start A0, B0
        self.register_buffer("lora_A0", torch.empty(r, d_in, **kw) if offset else None)
        self.register_buffer("lora_B0", torch.empty(d_out, r, **kw) if offset else None)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.n_heads, self.alpha, self.scaling = r, N, alpha, alpha / r
        self.dropout, self.init = dropout, init
        # the A, B (A0, B0) that merge() folded into W0 (empty: unmerged)
        _folded_buffers(self, "A", "B", *(("A0", "B0") if offset else ()))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """The docstring's init: A kaiming, W_r nn.Linear's, B_i zero, or random with A0, B0 kept
        (init="offset"). Also after to_empty(): model.apply() calls it after the sub-layers'."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if self.router is not None:
            self.router.reset_parameters()
        if self.lora_A0 is None:
            nn.init.zeros_(self.lora_B)
        else:                               # nn.Linear(r, d_out)'s kaiming_uniform(a=sqrt(5))
            nn.init.uniform_(self.lora_B, -1 / math.sqrt(self.r), 1 / math.sqrt(self.r))
            self.lora_A0.copy_(self.lora_A.weight)
            self.lora_B0.copy_(self.lora_B.mean(0))

    def forward(self, x):                                                # x (..., d_in)
        y = self.base(x)                                                 # W0 x: (..., d_out)
        if self.merged:                                                  # W0 holds the update
            return _merged_output(self, y)
        N, r, s = self.n_heads, self.r, self.scaling
        x, h = x.to(self.lora_A.weight.dtype), y.reshape(-1, y.shape[-1])  # h: (M, d_out)
        if self.router is not None:                                      # HydraLoRA
            # w = softmax(W_r x): per token, in fp32, on the un-dropped x
            w = self.router(x).float().softmax(-1).reshape(-1, N)        # (M, N)
            # z = A drop(x): one dropout mask, shared by the heads
            z = self.lora_A(self.drop(x)).reshape(-1, r)                 # (M, r)
            # z_i = w_i z, the heads' inputs side by side: z = [z_1 .. z_N]
            z = (w.unsqueeze(-1) * z.unsqueeze(1)).flatten(1)            # (M, N*r)
            B = self.lora_B.transpose(1, 2).reshape(N * r, -1)           # [B_1..B_N]^T: (N*r, d_o)
        else:                                                            # M-LoRA
            # z = A x
            z = self.lora_A(x).reshape(-1, r)                            # (M, r)
            if self.training and self.dropout > 0:
                # z_i = drop_i(z), a mask per head: z = [z_1 .. z_N]; the mean's 1/N goes into s
                z = self.drop(z.unsqueeze(1).expand(-1, N, r)).flatten(1)    # (M, N*r)
                B, s = self.lora_B.transpose(1, 2).reshape(N * r, -1), s / N  # (N*r, d_out)
            else:
                # no masks: mean_i B_i z = mean_i(B_i) z
                B = self.lora_B.mean(0).t().contiguous()                 # (r, d_out)
        # h = W0 x + s * sum_i B_i z_i, one fused matmul-add over the stacked heads
        h = torch.addmm(h, z.to(h.dtype), B.to(h.dtype), alpha=s)        # (M, d_out)
        if self.lora_A0 is not None:                                     # init="offset"
            # h = h - s * B0 A0 x: the start, subtracted, so step 0 computes the base
            z0 = nn.functional.linear(x, self.lora_A0).reshape(-1, r)    # A0 x: (M, r)
            B0 = self.lora_B0.t().to(h.dtype)                            # (r, d_out)
            h = torch.addmm(h, z0.to(h.dtype), B0, alpha=-self.scaling)
        return h.view(y.shape)

    @property
    def merged(self):
        return self.folded_A.numel() > 0

    def delta_weight(self, A=None, B=None, A0=None, B0=None):   # s (mean_i(B_i) A - B0 A0), fp32
        if A is None:
            A, B, A0, B0 = self.lora_A.weight, self.lora_B, self.lora_A0, self.lora_B0
        dW = B.float().mean(0) @ A.float()                                # (d_out, d_in)
        dW = self.scaling * (dW if A0 is None else dW - B0.float() @ A0.float())
        return dW.to(self.base.weight.device)

    def _folded(self):                                      # what merge() folded: A, B[, A0, B0]
        return [b for b in (self.folded_A, self.folded_B, getattr(self, "folded_A0", None),
                            getattr(self, "folded_B0", None)) if b is not None]

    @torch.no_grad()
    def merge(self):
        """W = W0 + s (mean_i(B_i) A - B0 A0) (merging twice is a no-op)."""
        if self.router is not None:
            raise ValueError("a routed (HydraLoRA) layer cannot be merged: its update changes with "
                             "the input through the router; keep it unmerged, or use router=False")
        _refuse_quantized([self], "merge_and_unload_multihead_lora")
        if not self.merged:
            self.folded_A, self.folded_B = self.lora_A.weight.clone(), self.lora_B.clone()
            if self.lora_A0 is not None:
                self.folded_A0, self.folded_B0 = self.lora_A0.clone(), self.lora_B0.clone()
            W = self.base.weight
            W.copy_((W.float() + self.delta_weight(*self._folded())).to(W.dtype))

    @torch.no_grad()
    def unmerge(self):
        """W0 = W - the update that was merged."""
        if self.merged:
            W = self.base.weight
            W.copy_((W.float() - self.delta_weight(*self._folded())).to(W.dtype))
            _folded_buffers(self)

    def extra_repr(self):
        return (f"r={self.r}, n_heads={self.n_heads}, alpha={self.alpha}, init={self.init}, "
                f"router={self.router is not None}, merged={self.merged}")


def _check_hparams(base, r, n_heads, alpha, dropout, router, init):
    if base is not None and not isinstance(base, nn.Linear):
        raise ValueError(f"MultiHeadLoRALinear wraps an nn.Linear, got a {type(base).__name__}")
    inits = ("zero",) if router else ("zero", "offset")   # a routed update has no constant start
    if not (_is_int(r, 1) and _is_int(n_heads, 1) and _is_num(alpha, 1e-30, 1e30)
            and _is_num(dropout, 0, 1) and isinstance(router, bool) and init in inits):
        raise ValueError(f"multi-head LoRA needs integers rank r >= 1 and n_heads >= 1, a number "
                         f"alpha in (0, 1e30) (s = alpha / r), dropout in [0, 1), router True or "
                         f"False, init in {inits} (router={router!r}); got {r=}, {n_heads=}, "
                         f"{alpha=}, {dropout=}, {init=}")


def add_multihead_lora(model: nn.Module, targets=("q", "k", "v", "o", "up", "down"), r: int = 4,
                       n_heads: int = 3, alpha: float = 32.0, dropout: float = 0.0,
                       router: bool = True, init: str = "zero", fp32_adapter: bool = True) -> list:
    """Wrap, in place, every nn.Linear whose dotted name ends with a target; freeze every parameter
    that is not an adapter's (the adapters of earlier add_* calls, of any file, keep their state).
    Returns the wrapped names."""
    _check_hparams(None, r, n_heads, alpha, dropout, router, init)
    return _adapt(model, targets, lambda base: MultiHeadLoRALinear(
        base, r, n_heads, alpha, dropout, router, init, fp32_adapter))


def multihead_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MultiHeadLoRALinear)]


def merge_multihead_lora(model: nn.Module):
    layers = [m for _, m in multihead_layers(model)]
    routed = [m for m in layers if m.router is not None]
    if routed:
        routed[0].merge()                      # refuses (routed), before any weight changes
    _refuse_quantized(layers, "merge_and_unload_multihead_lora")        # then quantized ones
    for m in layers:
        m.merge()


def unmerge_multihead_lora(model: nn.Module):
    for _, m in multihead_layers(model):
        m.unmerge()


def merge_and_unload_multihead_lora(model: nn.Module) -> nn.Module:
    """Merge every (router-free) multi-head layer and put its nn.Linear back in its place: a plain
    model with the same outputs. Returns the model (in place). Routed layers refuse, first."""
    merge_multihead_lora(model)
    return _unload(model, MultiHeadLoRALinear)


def multihead_state_dict(model: nn.Module) -> dict:
    """Only the adapter tensors (lora_A, lora_B, router; lora_A0, lora_B0 with init="offset")."""
    return {f"{n}.{k}".lstrip("."): v.detach().clone() for n, m in multihead_layers(model)
            for k, v in m.state_dict().items() if k.startswith(("lora_", "router."))}


def load_multihead_state_dict(model: nn.Module, state: dict):
    """Load tensors saved by multihead_state_dict into a model adapted with the same settings."""
    layers = [m for _, m in multihead_layers(model)]
    _load_adapters(model, state, multihead_state_dict(model), layers, "add_multihead_lora")

@torch.no_grad()
def head_similarity(model: nn.Module) -> dict:
    """Per layer, the mean off-diagonal cosine similarity between the flattened heads B_i.
    nan where it is undefined: N = 1, or some head is all zero (e.g. every head at zero init)."""
    sims = {}
    for name, m in multihead_layers(model):
        U = nn.functional.normalize(m.lora_B.float().flatten(1), dim=1)   # (N, d_out*r), unit rows
        C = U @ U.t()                                                      # (N, N) cosines
        N, defined = m.n_heads, m.n_heads > 1 and bool(m.lora_B.flatten(1).any(1).all())
        sims[name] = ((C.sum() - C.trace()) / (N * (N - 1))).item() if defined else float("nan")
    return sims


@contextlib.contextmanager
def record_routing(model: nn.Module):
    """Inside the block, each forward pass stores every routed layer's routing weights
    w = softmax(W_r x) (fp32, detached, (..., N)) in the yielded {name: w}; the last pass wins.
    Forward hooks on the routers do it, removed when the block ends; training pays nothing."""
    layers = [(n, m) for n, m in multihead_layers(model) if m.router is not None]
    if not layers:
        raise ValueError("the model has no routed multi-head LoRA layers (router=True) to record")
    records = {}

    def store(name, target):
        def hook(router, args, Wx):     # w = softmax(W_r x) from the router's output W_r x
            if router is target:        # not a copy's (copy.deepcopy of the model keeps the hook)
                records[name] = Wx.detach().float().softmax(-1)
        return hook
    hooks = [m.router.register_forward_hook(store(name, m.router)) for name, m in layers]
    try:
        yield records
    finally:
        for h in hooks:
            h.remove()


def routing_table(records: dict, task_ids: torch.Tensor, n_tasks: int, mask=None) -> torch.Tensor:
    """(n_tasks, N): mean routing weight per task and head, over layers and masked tokens.
    records: {name: (B, ..., N)} from record_routing; task_ids (B,); mask (B, ...), bool or integer
    (tokens where mask != 0), or None (tensors, lists or numpy arrays). A task with no (unmasked)
    token gets a row of nan."""
    shapes = {tuple(w.shape) for w in records.values()}
    if len(shapes) != 1:
        raise ValueError(f"records must come from one forward inside record_routing: non-empty, "
                         f"of one shape; got shapes {sorted(shapes)}")
    W = torch.stack([w.float() for w in records.values()]).mean(0)   # (B, ..., N), over layers
    Bsz, N, ids, shape = W.shape[0], W.shape[-1], torch.as_tensor(task_ids), tuple(W.shape[:-1])
    mask = torch.ones(shape, dtype=torch.bool) if mask is None else torch.as_tensor(mask)
    ints = (torch.int8, torch.int16, torch.int32, torch.long)
    if not (_is_int(n_tasks, 1) and ids.dtype in ints and ids.shape == (Bsz,)
            and bool(((ids >= 0) & (ids < n_tasks)).all())
            and mask.dtype in ints + (torch.bool, torch.uint8) and tuple(mask.shape) == shape):
        raise ValueError(f"routing_table needs n_tasks >= 1, task_ids: integers in [0, n_tasks) of "
                         f"shape ({Bsz},), mask: bool or integers of shape {shape}; got "
                         f"{n_tasks=}, task_ids {ids.dtype} {tuple(ids.shape)}, mask {mask.dtype} "
                         f"{tuple(mask.shape)}")
    W, mask = W.reshape(Bsz, -1, N), (mask != 0).reshape(Bsz, -1).to(W.device)  # (B, L, N), (B, L)
    t = ids.to(W.device, torch.long).view(Bsz, 1).expand(mask.shape)[mask]  # (K,) kept tokens
    sums = W.new_zeros(n_tasks, N).index_add_(0, t, W[mask])                # (n_tasks, N)
    counts = torch.bincount(t, minlength=n_tasks).to(W.dtype)               # (n_tasks,)
    return sums / counts[:, None]

# ------------------------------------------------------------------------------------------------
# Plumbing, the same in lora.py, multihead_lora.py and mtl_lora.py: a first read can skip it.


def _is_int(x, lo):                            # an integer >= lo (numpy's too; not a bool)
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= lo


def _is_num(x, lo, hi):                        # a real number in [lo, hi) (not a bool; NaN is not)
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and lo <= x < hi


def _adapter_dtype(base, fp32_adapter):
    """fp32 on a half-precision (bf16/fp16) or quantized (integer weight: bitsandbytes 4/8-bit)
    base unless fp32_adapter=False; else the base's dtype (quantized: its compute dtype; an 8-bit
    layer has none, so its bias's dtype, or fp32 without a bias)."""
    if not isinstance(fp32_adapter, bool):
        raise ValueError(f"fp32_adapter must be True or False, got {fp32_adapter!r}")
    W = base.weight
    if W.is_floating_point():
        half = W.dtype in (torch.float16, torch.bfloat16)
        return torch.float32 if fp32_adapter and half else W.dtype
    compute = getattr(base, "compute_dtype", None) or getattr(base.bias, "dtype", torch.float32)
    return torch.float32 if fp32_adapter else compute       # bnb 4-bit's compute_dtype, or bias'


def _refuse_quantized(layers, unload):
    """merge() adds a float update to W0 in place: refuse, before any change, a quantized W0 (its
    packed integer weight would take the update wrong, or fail)."""
    q = next((m.base for m in layers if not m.base.weight.is_floating_point()), None)
    if q is not None:
        raise ValueError(f"cannot merge into a quantized weight ({type(q).__name__}, "
                         f"{q.weight.dtype}): dequantize the model first (transformers: model = "
                         f"model.dequantize(dtype=torch.float32)), then {unload}(model); or serve "
                         f"it unmerged")


def _find_targets(model, targets):
    """Dotted names of the nn.Linear layers whose name ends with one of `targets` (peft-style),
    every name under which a layer is reachable (tied layers have several)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"the model to adapt must be an nn.Module, got {type(model).__name__}")
    ddp = any(isinstance(m, nn.parallel.DistributedDataParallel) for m in model.modules())
    if ddp or any(hasattr(p, "full_tensor") for p in model.parameters()):   # DTensor: fully_shard
        raise ValueError("the model is wrapped for data parallelism already (DDP, or fully_shard's "
                         "sharded parameters): adapt the plain model first, then wrap it (wrapped, "
                         "each process would train an adapter of its own)")
    targets = [targets] if isinstance(targets, str) else targets
    if not (isinstance(targets, (list, tuple, set)) and targets
            and all(isinstance(t, str) and t for t in targets)):
        raise ValueError(f"targets must be a layer name or a list of names (the ends of dotted "
                         f"names, e.g. ['q', 'v']), got {targets!r}")
    modules = dict(model.named_modules(remove_duplicate=False))
    hit = lambda n, t: n == t or n.endswith("." + t)
    found = [n for n in modules if any(hit(n, t) for t in targets)]
    unmatched = [t for t in targets if not any(hit(n, t) for n in found)]
    if unmatched:
        linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        raise ValueError(f"targets {unmatched} match no layer of the model; name some of its "
                         f"nn.Linear layers (by the end of their names): {linears[:20]}")
    for name in found:
        parent, mod = modules[name.rpartition(".")[0]], modules[name]
        if hasattr(parent, "lora_A") or hasattr(mod, "lora_A"):
            raise ValueError(f"'{name}' is an adapter or inside one: adapt each layer once")
        if isinstance(parent, nn.MultiheadAttention):
            raise ValueError(f"'{name}' belongs to nn.MultiheadAttention, which reads its weight "
                             "directly, so an adapter would do nothing; target other layers")
        if not isinstance(mod, nn.Linear):
            raise ValueError(f"target '{name}' is a {type(mod).__name__}, not an nn.Linear")
    return found


def _adapt(model, targets, make):
    """Put make(layer) in the place of each target layer (one wrapper for a layer reachable under
    several names); freeze every parameter outside an adapter layer (one with a `lora_A`) of any
    of the three files, so files combine; switch off the encoders' fast paths."""
    names = _find_targets(model, targets)
    modules = dict(model.named_modules(remove_duplicate=False))
    new = {}
    for name in names:
        if id(modules[name]) not in new:
            new[id(modules[name])] = make(modules[name])
    keep = {id(p) for m in list(model.modules()) + list(new.values()) if hasattr(m, "lora_A")
            for k, p in m.named_parameters() if not k.startswith("base.")}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)
    for name, mod in modules.items():
        if id(mod) in new:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new[id(mod)])
    _keep_off_fast_paths(model)
    return names


def _unload(model, cls):
    """Put each `cls` layer's (merged) base nn.Linear back in its place, under all its names."""
    if isinstance(model, cls):
        return model.base
    for name, mod in list(model.named_modules(remove_duplicate=False)):
        if isinstance(mod, cls):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, mod.base)
    return model


def _keep_off_fast_paths(model):
    """nn.TransformerEncoder(Layer)'s inference fast paths read linear1.weight themselves and
    would crash on or skip an adapter: the nested-tensor path is turned off by a flag, the
    layer's fused path by any forward pre-hook (here a no-op one that pickles)."""
    for m in model.modules():
        if not isinstance(m, (nn.TransformerEncoder, nn.TransformerEncoderLayer)):
            continue
        adapters = [a for a in m.modules() if hasattr(a, "lora_A")]
        if isinstance(m, nn.TransformerEncoder) and adapters:
            m.use_nested_tensor = False
        if isinstance(m, nn.TransformerEncoderLayer):
            for a in adapters:
                if _no_op not in a._forward_pre_hooks.values():
                    a.register_forward_pre_hook(_no_op)


def _no_op(module, args):
    return None


def _folded_buffers(layer, *names):
    """(Re)set the buffers folded_<name> that merge() fills (no names: every one) to empty, which
    means unmerged. They are in the state_dict as plain tensors, so a merged model saves and
    reloads exactly; a load resizes them first (merged into unmerged and back)."""
    names = names or [n[len("folded_"):] for n, _ in layer.named_buffers(recurse=False)
                      if n.startswith("folded_")]
    for n in names:
        old = getattr(layer, "folded_" + n, layer.lora_A.weight)           # keeps its dtype
        layer.register_buffer("folded_" + n, old.new_empty(0, device=layer.lora_A.weight.device))
    if _resize_folded not in layer._load_state_dict_pre_hooks.values():
        layer._register_load_state_dict_pre_hook(_resize_folded, with_module=True)


def _resize_folded(layer, state, prefix, *args):
    for n, b in layer.named_buffers(recurse=False):
        if n.startswith("folded_") and torch.is_tensor(state.get(prefix + n)):
            setattr(layer, n, torch.empty_like(state[prefix + n], device=b.device, dtype=b.dtype))


def _merged_output(layer, h):
    if layer.training and torch.is_grad_enabled():
        warnings.warn(f"a merged {type(layer).__name__} is training: its adapter is not used and "
                      "gets no gradient; unmerge to train, or call model.eval() to serve",
                      stacklevel=2)
    return h


def _load_adapters(model, state, own, layers, add):
    """Load adapter tensors (as <file>_state_dict gives them) into a model adapted alike."""
    if not own or any(m.merged for m in layers):
        unmerge = add.replace("add_", "unmerge_")
        raise ValueError(f"load into a model adapted alike and unmerged: {add}(model, ...) first, "
                         f"with the same settings; {unmerge}(model) if merged")
    shards = sorted({k for d in (state, own) for k, v in d.items() if hasattr(v, "full_tensor")})
    if shards:                                  # DTensor's mark, without importing distributed
        raise ValueError(f"sharded (DTensor) adapter tensors at {shards[:2]}: load into the model "
                         "before fully_shard, and save the full tensors (get_model_state_dict("
                         "model, options=StateDictOptions(full_state_dict=True)) on each process)")
    bad = sorted(k for k in own.keys() | state.keys()
                 if k not in own or k not in state or own[k].shape != state[k].shape)
    if bad:
        raise ValueError(f"adapter tensors do not fit this model at {bad[:4]}: missing, unexpected "
                         "or of another shape; load into a model adapted alike (the same targets, "
                         "rank and other settings); a whole state_dict loads with load_state_dict")
    model.load_state_dict(state, strict=False)

# Our choices and the limits of this file:
# - M-LoRA takes the mean of the heads (the paper says sum and mean in different places).
# - HydraLoRA's authors draw a dropout mask per head on x; ours shares one on x (one A x, not N).
# - M-LoRA's dropout acts per head on z = A x, as in the Align-LoRA authors' code.
# - init="offset": the authors subtract the start from W0 (the same function); we keep W0 untouched.
# - init="offset" draws B_i like nn.Linear(r, d_out); s stays alpha/r (the authors: alpha/sqrt(r)).
# - Routing weights are computed only inside `record_routing` (hooks): training pays nothing.
# - head_similarity is nan for N = 1 or an all-zero head (cosine undefined).
# - Dtypes: on a bf16/fp16 base the adapter is fp32 by default, as in peft (in half precision
#   small updates are lost to rounding); fp32_adapter=False keeps the base's dtype. x is cast to
#   the adapter's dtype and the update to the output's, so autocast works.
# - A quantized base (an nn.Linear with an integer weight: bitsandbytes' Linear4bit, Linear8bitLt,
#   as transformers loads them; QLoRA) gets fp32 adapters too (fp32_adapter=False: the layer's
#   compute dtype); no bitsandbytes import. Merging into it is refused before any change (the
#   packed weight cannot take a float update): dequantize first (transformers'
#   model.dequantize(dtype=torch.float32)), then merge and unload.
# - merge() forms the update in fp32 and casts once; in bf16, merge then unmerge restores W0 only
#   to bf16 rounding. A merged layer keeps the A and B it folded in as buffers (folded_A,
#   folded_B), so unmerge() is exact even if they change, and a merged model saves (torch.save, HF
#   save_pretrained, Trainer checkpoints) and reloads exactly. Training a merged layer warns.
# - add_multihead_lora freezes every parameter that is not an adapter's, a classification head too
#   (as peft does without modules_to_save): set requires_grad_(True) on what should train besides.
# - Only nn.Linear: HF GPT-2's Conv1D (weight stored transposed) is refused, not adapted.
# - nn.MultiheadAttention's out_proj is refused: MHA reads its weight directly, an adapter there
#   would do nothing. nn.TransformerEncoder's inference fast paths also read linear1.weight
#   directly; add_multihead_lora switches them off in the encoders it adapts.
