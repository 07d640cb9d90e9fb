"""MTL-LoRA: Low-Rank Adaptation for Multi-Task Learning (Yang et al., AAAI 2025, arXiv 2410.09437).

A frozen linear layer W0 (d_out x d_in) gets a low-rank update that depends on each sample's task t:

    h_t = W0 x + s * (sum_i p_{t,i} B_i) Lam_t A drop(x),   p_t = softmax(w_t / tau),  s = alpha / r

A (r x d_in) is shared by all tasks; Lam_t (r x r) transforms the low-rank code A x per task;
n shared up-projections B_i (d_out x r) are mixed per task by p_t, a softmax over n logits w_t
sharpened by the temperature tau. What trains: A, Lam, B, w: r*d_in + T*r*r + n*r*d_out + T*n
parameters per layer (diagonal Lam: T*r instead of T*r*r). Init (authors' code): A, w ~
kaiming_uniform(a=sqrt(5)), Lam_t = identity (diagonal: ones), B_i = 0: step 0 equals the base.
With that init (w_t in +-1/sqrt(n)) and tau = 0.1, p_t starts close to one-hot: each task is
given mostly to one up-projection, at random (the largest p_{t,i} averages 0.84 for n = 3, and is
above 0.5 for 97% of tasks; at tau = 1 it averages 0.43).
Defaults r=8, alpha=16, n=3, tau=0.1: the authors' commonsense script (LLaMA-2-7B, q,k,v,o,
dropout 0.05). Their other tau values: class default 0.0 (a bug: we require tau > 0), argparse
default 1.0, image-text script 0.8 (with r=64, n=2).
Merging is exact per task: W_t = W0 + s (sum_i p_{t,i} B_i) Lam_t A serves task t at nn.Linear
cost. Task ids: one per sample, an integer tensor (B,), a batch may mix tasks; the batch is dim 0
of every adapted layer's input x (B, ..., d_in).

Usage on any model built of nn.Linear layers (no edits to its code):

    import torch, mtl_lora
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    mtl_lora.add_mtl_lora(model, n_tasks=3, targets=["0", "2"], r=4)   # only the adapters train
    with mtl_lora.task_ids(model, torch.tensor([0, 2, 1, 0])):        # one task id per sample
        out = model(torch.randn(4, 16))                                # (4, 4)

Our choices and the limits of this file are listed at its end.
"""
import contextlib
import math
import numbers
import warnings

import torch
import torch.nn as nn


class MTLLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, n_tasks: int, r: int = 8, n_up: int = 3,
                 alpha: float = 16.0, tau: float = 0.1, dropout: float = 0.0,
                 diagonal: bool = False, fp32_adapter: bool = True):
        super().__init__()
        _check_hparams(base, n_tasks, r, n_up, alpha, tau, dropout)
        kw = dict(device=base.weight.device, dtype=_adapter_dtype(base, fp32_adapter))
        self.base = base.requires_grad_(False)                          # W0, frozen
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kw)  # A: (r, d_in)
        lam = (n_tasks, r) if diagonal else (n_tasks, r, r)
        self.lora_lambda = nn.Parameter(torch.empty(lam, **kw))         # Lam: (T, r, r) or (T, r)
        self.lora_B = nn.Parameter(torch.empty(n_up, base.out_features, r, **kw))   # (n, d_out, r)
        self.lora_w = nn.Parameter(torch.empty(n_tasks, n_up, **kw))    # w: (T, n)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.n_tasks, self.r, self.n_up, self.alpha, self.tau = n_tasks, r, n_up, alpha, tau
        self.scaling, self.diagonal = alpha / r, diagonal
        # the task t and the A, Lam_t, B, w_t that merge(t) folded into W0 (empty: unmerged)
        self.register_buffer("folded_task", torch.empty(0, dtype=torch.long, device=kw["device"]))
        _folded_buffers(self, "A", "lambda", "B", "w")
        self.task_ids = None        # (B,), set by `with task_ids(model, ids)`
        self.reset_parameters()

    def reset_parameters(self):
        """The paper's init, A, w ~ kaiming_uniform(a=sqrt(5)), Lam_t = I (diagonal: ones), B_i = 0
        (also after to_empty(); model.apply() calls it after the sub-layers' own reset)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_w, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        with torch.no_grad():
            lam = self.lora_lambda
            I = torch.eye(self.r, device=lam.device, dtype=lam.dtype)
            lam.copy_((I.diagonal() if self.diagonal else I).expand_as(lam))

    def mixing(self):                                   # p = softmax(w / tau): (T, n), fp32
        return torch.softmax(self.lora_w.float() / self.tau, dim=-1)

    def forward(self, x):                                       # x (B, ..., d_in)
        h = self.base(x)                                        # W0 x: (B, ..., d_out)
        if self.merged:                                         # W0 already holds task t's update
            return _merged_output(self, h)
        t = self._ids_for(x)                                    # each sample's task: (B,)
        # z = A drop(x): (B, L, r)
        z = self.lora_A(self.drop(x.to(self.lora_A.weight.dtype))).view(len(t), -1, self.r)
        # p_t = softmax(w_t / tau), for every task
        p = self.mixing()                                       # (T, n), fp32
        Lam = torch.diag_embed(self.lora_lambda) if self.diagonal else self.lora_lambda  # (T, r, r)
        # (sum_i p_{t,i} B_i) Lam_t = [B_1 ... B_n] kron(p_t, Lam_t); kron = [p_{t,1} Lam_t; ...]
        pLam = (p[:, :, None, None] * Lam[:, None]).flatten(1, 2).to(z.dtype)          # (T, n r, r)
        # kron(p_t, Lam_t) z, each sample with its own task t
        z = torch.bmm(z, pLam[t].mT).flatten(0, 1)             # (M, n r), M = B L
        # [B_1 ... B_n]^T, contiguous
        Bt = self.lora_B.mT.reshape(-1, h.shape[-1]).to(h.dtype)                      # (n r, d_out)
        # h + s [B_1 ... B_n] kron(p_t, Lam_t) z, one fused matmul-add: (M, d_out) + s (M, n r) @ Bt
        h2 = torch.addmm(h.reshape(-1, h.shape[-1]), z.to(h.dtype), Bt, alpha=self.scaling)
        return h2.view(h.shape)

    def _ids_for(self, x):
        t = self.task_ids
        if t is None or x.dim() < 2 or len(t) != x.shape[0]:
            raise ValueError(f"{'no' if t is None else len(t)} task ids for input {tuple(x.shape)}"
                             ": call the model `with task_ids(model, ids):`, one id per sample, in "
                             "dim 0 (nn.TransformerEncoder: batch_first=True), the backward inside "
                             "it too under gradient checkpointing; or merge_mtl_lora")
        return t

    @property
    def merged(self):
        return self.folded_A.numel() > 0

    @property
    def merged_task(self):                                      # (reads the task on the host)
        return int(self.folded_task) if self.merged else None

    def delta_weight(self, task: int, folded=None):             # (d_out, d_in), fp32
        """s (sum_i p_{t,i} B_i) Lam_t A of task t, from the current tensors or `folded`."""
        A, Lam_t, B, w_t = folded or (self.lora_A.weight, self.lora_lambda[task], self.lora_B,
                                      self.lora_w[task])                # fp32 below
        p_t = torch.softmax(w_t.float() / self.tau, dim=-1)                     # (n,)
        Lam_t = torch.diag(Lam_t.float()) if self.diagonal else Lam_t.float()   # (r, r)
        dW = self.scaling * torch.einsum("i,ior->or", p_t, B.float()) @ Lam_t @ A.float()
        return dW.to(self.base.weight.device)

    def _check_merge(self, task):                     # before any change: W0 float, task valid
        _refuse_quantized([self], "merge_and_unload_mtl_lora")
        if not (_is_int(task, 0) and task < self.n_tasks):
            raise ValueError(f"merge needs one task id, an int in [0, {self.n_tasks}), "
                             f"got {task!r}")
        if self.merged_task not in (None, task):
            raise ValueError(f"this layer is merged for task {self.merged_task}: unmerge_mtl_lora"
                             f"(model) before merging task {task}")

    @torch.no_grad()
    def merge(self, task: int):
        """W_t = W0 + s (sum_i p_{t,i} B_i) Lam_t A (merging twice for the same task is a no-op)."""
        self._check_merge(task)
        task = int(task)
        if not self.merged:
            self.folded_task = torch.tensor([task], device=self.folded_task.device)
            self.folded_A, self.folded_B = self.lora_A.weight.clone(), self.lora_B.clone()
            self.folded_lambda = self.lora_lambda[task].clone()
            self.folded_w = self.lora_w[task].clone()
            W = self.base.weight
            W.copy_((W.float() + self.delta_weight(task, self._folded())).to(W.dtype))

    @torch.no_grad()
    def unmerge(self):
        """W0 = W_t - s (sum_i p_{t,i} B_i) Lam_t A, with the tensors that were merged."""
        if self.merged:
            W = self.base.weight
            W.copy_((W.float() - self.delta_weight(None, self._folded())).to(W.dtype))
            _folded_buffers(self)

    def _folded(self):                                          # (A, Lam_t, B, w_t) merge() folded
        return self.folded_A, self.folded_lambda, self.folded_B, self.folded_w

    def extra_repr(self):
        return (f"n_tasks={self.n_tasks}, r={self.r}, n_up={self.n_up}, alpha={self.alpha}, "
                f"tau={self.tau}, diagonal={self.diagonal}, merged_task={self.merged_task}")


def _check_hparams(base, n_tasks, r, n_up, alpha, tau, dropout):
    if base is not None and not isinstance(base, nn.Linear):
        raise ValueError(f"MTLLoRALinear wraps an nn.Linear, got a {type(base).__name__}")
    if not (all(_is_int(v, 1) for v in (n_tasks, r, n_up)) and _is_num(alpha, 1e-30, 1e30)
            and _is_num(tau, 1e-30, 1e30) and _is_num(dropout, 0, 1)):
        raise ValueError("MTL-LoRA needs integers n_tasks, rank r and n_up >= 1, numbers alpha and "
                         f"tau in (0, 1e30) and dropout in [0, 1); got {n_tasks=}, {r=}, {n_up=}, "
                         f"{alpha=}, {tau=}, {dropout=}")


def add_mtl_lora(model: nn.Module, n_tasks: int, targets=("q", "k", "v", "o", "up", "down"),
                 r: int = 8, n_up: int = 3, alpha: float = 16.0, tau: float = 0.1,
                 dropout: float = 0.0, diagonal: bool = False, fp32_adapter: bool = True) -> list:
    """Wrap, in place, every nn.Linear whose dotted name ends with a target; freeze every parameter
    that is not an adapter's (the adapters of earlier add_* calls, of any file, keep their state).
    Returns the wrapped names."""
    _check_hparams(None, n_tasks, r, n_up, alpha, tau, dropout)
    return _adapt(model, targets, lambda base: MTLLoRALinear(
        base, n_tasks, r, n_up, alpha, tau, dropout, diagonal, fp32_adapter))


def mtl_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, MTLLoRALinear)]


@contextlib.contextmanager
def task_ids(model: nn.Module, ids):
    """Give every MTL-LoRA layer of `model` the per-sample task ids (B,) for the calls inside.
    The ids are set on the layers: not thread-safe (one model per thread)."""
    layers, ids = mtl_layers(model), torch.as_tensor(ids)
    if not layers:
        raise ValueError("the model has no MTL-LoRA layers: call add_mtl_lora(model, ...) first")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.ndim != 1:
        raise ValueError(f"task ids must be integers, shape (batch,), got {ids.dtype} {ids.shape}")
    T = min(m.n_tasks for m in layers)
    torch._assert_async(((ids >= 0) & (ids < T)).all(), f"task ids must be in [0, n_tasks={T})")
    on, saved = {}, [m.task_ids for m in layers]                # ids moved once per device
    try:
        for m in layers:
            dev = m.lora_w.device
            if dev not in on:
                on[dev] = ids.to(dev, torch.long, non_blocking=True)
            m.task_ids = on[dev]
            if m.merged:                                        # merged for t: t's samples only
                torch._assert_async((m.task_ids == m.folded_task).all(), "the model is merged for"
                                    " one task (see merged_task): give it that task's samples only,"
                                    " or unmerge_mtl_lora(model) first")
        yield
    finally:
        for m, old in zip(layers, saved):
            m.task_ids = old


def merge_mtl_lora(model: nn.Module, task: int):
    """Fold task `task`'s update into every layer's weight (all checked before any change)."""
    layers = mtl_layers(model)
    for m in layers:
        m._check_merge(task)
    for m in layers:
        m.merge(task)


def unmerge_mtl_lora(model: nn.Module):
    for m in mtl_layers(model):
        m.unmerge()


def merge_and_unload_mtl_lora(model: nn.Module, task: int) -> nn.Module:
    """Merge task `task` into every MTL-LoRA layer and put its nn.Linear back in its place: a
    plain model that computes task `task` (no task ids needed). Returns the model (in place)."""
    merge_mtl_lora(model, task)
    return _unload(model, MTLLoRALinear)


def mixing_weights(model: nn.Module) -> dict:
    """{layer name: p (T, n)}, the softmax(w / tau) mixing of the up-projections, fp32, detached."""
    return {n: m.mixing().detach() for n, m in model.named_modules()
            if isinstance(m, MTLLoRALinear)}


def mtl_state_dict(model: nn.Module) -> dict:
    """Only the adapter tensors (lora_A, lora_lambda, lora_B, lora_w), detached, for torch.save."""
    return {f"{n}.{k}".lstrip("."): v.detach().clone() for n, m in model.named_modules()
            if isinstance(m, MTLLoRALinear)
            for k, v in m.state_dict().items() if k.startswith("lora_")}


def load_mtl_state_dict(model: nn.Module, state: dict):
    """Load adapter tensors saved by mtl_state_dict into a model adapted with the same settings."""
    _load_adapters(model, state, mtl_state_dict(model), mtl_layers(model), "add_mtl_lora")

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
# - Layout: `lora_A` = nn.Linear(d_in, r, bias=False) as in peft; `lora_lambda` (T, r, r) or (T, r),
#   `lora_B` (n, d_out, r), `lora_w` (T, n) Parameters; the wrapped layer is `.base`.
# - Ids reach the layers through a context manager (nested ones restore the outer ids), not an
#   extra forward argument as in the authors' code. The ids are set on the layers: one model
#   must not run `with task_ids(...)` in several threads at once (use one model per thread). It
#   reads no tensor value on the host: a device-side assert checks the range (and a merged
#   model's task); it raises at once on CPU, at a later kernel launch on CUDA, where it leaves
#   the CUDA context unusable (restart the process).
# - dropout defaults to 0 as in lora.py (the authors used 0.05: pass dropout=0.05). No extra bias
#   (the authors add a random frozen bias to bias-free layers, a bug). The softmax is fp32.
# - Dtypes: on a bf16/fp16 base the adapter is fp32 by default, as in peft (in half precision
#   small updates are lost to rounding); fp32_adapter=False keeps the base's dtype. x is cast to
#   the adapter's dtype and the update to the output's, so autocast works.
# - A quantized base (an nn.Linear with an integer weight: bitsandbytes' Linear4bit, Linear8bitLt,
#   as transformers loads them; QLoRA) gets fp32 adapters too (fp32_adapter=False: the layer's
#   compute dtype); no bitsandbytes import. Merging into it is refused before any change (the
#   packed weight cannot take a float update): dequantize first (transformers'
#   model.dequantize(dtype=torch.float32)), then merge and unload.
# - merge() forms the update in fp32 and casts once; in bf16, merge then unmerge restores W0 only
#   to bf16 rounding. A merged layer keeps the task and the A, Lam_t, B, w_t it folded in as
#   buffers (folded_*), so unmerge() is exact even if they change, and a merged model saves
#   (torch.save, HF save_pretrained, Trainer checkpoints) and reloads exactly. Training a merged
#   layer warns.
# - add_mtl_lora freezes every parameter that is not an adapter's, a classification head too (as
#   peft does without modules_to_save): set requires_grad_(True) on what should train besides.
# - Only nn.Linear: HF GPT-2's Conv1D (weight stored transposed) is refused, not adapted.
# - nn.MultiheadAttention's out_proj is refused: MHA reads its weight directly, an adapter there
#   would do nothing. nn.TransformerEncoder's inference fast paths also read linear1.weight
#   directly; add_mtl_lora switches them off in the encoders it adapts (build them batch_first).
