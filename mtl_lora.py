"""MTL-LoRA: Low-Rank Adaptation for Multi-Task Learning (Yang et al., AAAI 2025, arXiv 2410.09437).

A frozen linear layer W0 (d_out x d_in) gets a low-rank update that depends on each sample's task t:

    h_t = W0 x + s * (sum_i p_{t,i} B_i) Lam_t A drop(x),   p_t = softmax(w_t / tau),  s = alpha / r

A (r x d_in) is shared by all tasks; Lam_t (r x r) transforms the low-rank code A x per task;
n shared up-projections B_i (d_out x r) are mixed per task by p_t, a softmax over n logits w_t
sharpened by the temperature tau. A, Lam, B and w train; everything else is frozen. Per layer:
r*d_in + T*r*r + n*r*d_out + T*n parameters (diagonal Lam: T*r instead of T*r*r).
Init (authors' code): A and w kaiming_uniform(a=sqrt(5)), Lam_t identity (diagonal: ones),
B_i = 0, so the adapted model equals the base at step 0. Defaults r=8, alpha=16, n=3, tau=0.1
are the authors' commonsense setting on LLaMA-2-7B (q,k,v,o, dropout 0.05); image-text used
r=64, n=2, tau=0.8.

Task ids: one per sample, a LongTensor (B,); a batch may mix tasks. The batch is dim 0 of every
adapted layer's input x (B, ..., d_in), so batch-second models (e.g. nn.TransformerEncoder
without batch_first=True) must be built with batch_first=True. `with task_ids(model, ids):
out = model(x)` hands the ids to every layer; the host model's forward signature is unchanged.

Merging is exact per task: W_t = W0 + s * (sum_i p_{t,i} B_i) Lam_t A (fp32 product, cast once)
serves task t at nn.Linear cost; a layer merged for t refuses ids of other tasks. Dtypes: the
input is cast to the adapter's dtype and the update back to the output's (as in lora.py).

Our choice: ids reach the layers through a context manager that checks them once (dtype, shape,
  range: one host sync per batch), instead of an extra forward argument as in the authors' code.
Our choice: dropout defaults to 0 like lora.py (the authors used 0.05; pass dropout=0.05).
Our choice: tau must be > 0 (the authors' code defaults to 0, a division by zero).
Our choice: no extra bias (the authors add a random frozen bias to bias-free layers, a bug).
Our choice: the mixing softmax is taken in fp32 whatever the parameters' dtype.
Our choice: nested task_ids contexts restore the outer ids on exit.

Usage on any model built of nn.Linear layers (no edits to its code):

    import torch, mtl_lora
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    mtl_lora.add_mtl_lora(model, n_tasks=3, targets=["0", "2"], r=4)   # only the adapters train
    with mtl_lora.task_ids(model, torch.tensor([0, 2, 1, 0])):        # one task id per sample
        out = model(torch.randn(4, 16))                                # (4, 4)
"""
import contextlib
import math

import torch
import torch.nn as nn


class MTLLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, n_tasks: int, r: int = 8, n_up: int = 3, alpha: float = 16.0,
                 tau: float = 0.1, dropout: float = 0.0, diagonal: bool = False):
        super().__init__()
        _check_hparams(n_tasks, r, n_up, alpha, tau, dropout)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"MTLLoRALinear wraps an nn.Linear, got a {type(base).__name__}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        d_in, d_out = base.in_features, base.out_features
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(d_in, r, bias=False, **kw)                  # weight (r, d_in)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        lam = torch.ones(n_tasks, r, **kw) if diagonal else torch.eye(r, **kw).repeat(n_tasks, 1, 1)
        self.lora_lambda = nn.Parameter(lam)                                # (T, r, r) or (T, r)
        self.lora_B = nn.Parameter(torch.zeros(n_up, d_out, r, **kw))       # (n, d_out, r)
        self.lora_w = nn.Parameter(torch.empty(n_tasks, n_up, **kw))        # (T, n)
        nn.init.kaiming_uniform_(self.lora_w, a=math.sqrt(5))
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.n_tasks, self.n_up, self.r, self.alpha, self.tau = n_tasks, n_up, r, alpha, tau
        self.scaling, self.diagonal = alpha / r, diagonal
        self.merged_task = None
        self.task_ids, self._id_range = None, None   # set by task_ids(model, ids)

    def mixing(self):                                        # (T, n) fp32, p_t = softmax(w_t / tau)
        return torch.softmax(self.lora_w.float() / self.tau, dim=-1)

    def _ids_for(self, x):
        ids = self.task_ids
        if ids is None:
            if self.merged_task is None:
                raise ValueError("MTL-LoRA needs one task id per sample: wrap the call in "
                                 "`with task_ids(model, ids): out = model(x)` (ids a LongTensor "
                                 "(batch,)), or merge_mtl_lora(model, task) to serve one task")
            return None
        if x.dim() < 2 or ids.shape[0] != x.shape[0]:
            raise ValueError(f"{ids.shape[0]} task ids for a layer input of shape {tuple(x.shape)}: "
                             "give one id per sample; the batch must be dim 0 of every adapted "
                             "layer's input (build nn.TransformerEncoder with batch_first=True)")
        t = self.merged_task
        if t is not None and ids.numel():
            lo, hi = self._id_range or torch.stack(torch.aminmax(ids)).tolist()   # set by task_ids
            if (lo, hi) != (t, t):
                raise ValueError(f"this layer is merged for task {t} but got task ids {lo}..{hi}; "
                                 "unmerge_mtl_lora(model) to run other or mixed tasks")
        return ids

    def forward(self, x):                                    # x (B, ..., d_in)
        out = self.base(x)                                   # (B, ..., d_out)
        ids = self._ids_for(x)                               # (B,) or None when merged
        if self.merged_task is not None:
            return out
        Bsz, L, r, n = x.shape[0], math.prod(x.shape[1:-1]), self.r, self.n_up
        z = self.lora_A(self.drop(x.to(self.lora_A.weight.dtype))).reshape(Bsz, L, r)   # (B, L, r)
        lam = self.lora_lambda[ids].to(z.dtype)              # (B, r, r) or (B, r)
        z = z * lam[:, None, :] if self.diagonal else torch.bmm(z, lam.transpose(1, 2))  # Lam_t z
        p = self.mixing()[ids]                               # (B, n) fp32
        zp = (p[:, None, :, None] * z[:, :, None, :]).reshape(Bsz * L, n * r)          # (B*L, n*r)
        Bcat = self.lora_B.permute(0, 2, 1).reshape(n * r, -1).to(out.dtype)        # (n*r, d_out)
        # out + s * sum_i p_i B_i z in one fused matmul-add over the stacked heads
        h = torch.addmm(out.reshape(-1, out.shape[-1]), zp.to(out.dtype), Bcat, alpha=self.scaling)
        return h.view(out.shape)

    def delta_weight(self, task: int):                       # (d_out, d_in), fp32
        p = self.mixing()[task]                              # (n,)
        B = torch.einsum("n,nor->or", p, self.lora_B.float())                # (d_out, r)
        lam = self.lora_lambda[task].float()
        lam = torch.diag(lam) if self.diagonal else lam                       # (r, r)
        return self.scaling * (B @ lam @ self.lora_A.weight.float())

    def _check_task(self, task):
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.n_tasks:
            raise ValueError(f"merge needs one task id, an int in [0, {self.n_tasks}), got {task!r}")
        if self.merged_task is not None and self.merged_task != task:
            raise ValueError(f"already merged for task {self.merged_task}; unmerge before "
                             f"merging task {task}")

    @torch.no_grad()
    def merge(self, task: int):
        self._check_task(task)
        if self.merged_task is None:
            w = self.base.weight
            w.copy_((w.float() + self.delta_weight(task)).to(w.dtype))
            self.merged_task = task

    @torch.no_grad()
    def unmerge(self):
        if self.merged_task is not None:
            w = self.base.weight
            w.copy_((w.float() - self.delta_weight(self.merged_task)).to(w.dtype))
            self.merged_task = None

    def extra_repr(self):
        return (f"n_tasks={self.n_tasks}, r={self.r}, n_up={self.n_up}, alpha={self.alpha}, "
                f"tau={self.tau}, diagonal={self.diagonal}, merged_task={self.merged_task}")


def _check_hparams(n_tasks, r, n_up, alpha, tau, dropout):
    for what, v in (("n_tasks", n_tasks), ("rank r", r), ("n_up (shared B_i)", n_up)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"MTL-LoRA {what} must be an integer >= 1, got {v!r}")
    if not alpha > 0:
        raise ValueError(f"MTL-LoRA alpha must be > 0 (scaling is alpha / r), got {alpha!r}")
    if not 0 < tau < math.inf:
        raise ValueError(f"MTL-LoRA temperature tau must be a finite number > 0 (the mixing is "
                         f"softmax(w / tau); the authors used 0.1), got {tau!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"MTL-LoRA dropout must be in [0, 1), got {dropout!r}")


def _find_targets(model: nn.Module, targets):
    """Dotted names of the nn.Linear layers whose name ends with one of `targets` (peft-style)."""
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ValueError("targets is empty: name at least one linear layer, e.g. targets=['q', 'v']")
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


def add_mtl_lora(model: nn.Module, n_tasks: int, targets=("q", "k", "v", "o", "up", "down"),
                 r: int = 8, n_up: int = 3, alpha: float = 16.0, tau: float = 0.1,
                 dropout: float = 0.0, diagonal: bool = False) -> list:
    """Wrap, in place, every nn.Linear whose dotted name ends with a target; freeze the rest."""
    _check_hparams(n_tasks, r, n_up, alpha, tau, dropout)
    names = _find_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, MTLLoRALinear(getattr(parent, child), n_tasks, r, n_up, alpha, tau,
                                             dropout, diagonal))
        if isinstance(parent, nn.TransformerEncoderLayer):
            # its inference fast path reads linear1.weight itself and would skip the adapter;
            # any hook on a sub-module turns that path off
            getattr(parent, child).register_forward_pre_hook(_keep_off_fast_path)
    return names


def _keep_off_fast_path(module, args):
    return None


def mtl_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, MTLLoRALinear)]


@contextlib.contextmanager
def task_ids(model: nn.Module, ids):
    """Give every MTL-LoRA layer of `model` the per-sample task ids (B,) for the calls inside."""
    layers = mtl_layers(model)
    if not layers:
        raise ValueError("the model has no MTL-LoRA layers: call add_mtl_lora(model, ...) first")
    ids = torch.as_tensor(ids)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"task ids must be integers (a LongTensor), got dtype {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"task ids must be 1-D, one per sample (batch,), got {tuple(ids.shape)}")
    ids = ids.long()
    rng = tuple(torch.stack(torch.aminmax(ids)).tolist()) if ids.numel() else None   # one sync
    T = min(m.n_tasks for m in layers)
    if rng is not None and (rng[0] < 0 or rng[1] >= T):
        raise ValueError(f"task ids must be in [0, {T}) (the model's MTL-LoRA layers have "
                         f"n_tasks={T}), got ids from {rng[0]} to {rng[1]}")
    on = {}                                                  # ids copied once per device
    saved = [(m.task_ids, m._id_range) for m in layers]
    try:
        for m in layers:
            dev = m.lora_w.device
            if dev not in on:
                on[dev] = ids.to(dev, non_blocking=True)
            m.task_ids, m._id_range = on[dev], rng
        yield
    finally:
        for m, (old, old_rng) in zip(layers, saved):
            m.task_ids, m._id_range = old, old_rng


def merge_mtl_lora(model: nn.Module, task: int):
    """Fold task `task`'s update into every layer's weight (all checked before any change)."""
    layers = mtl_layers(model)
    for m in layers:
        m._check_task(task)
    for m in layers:
        m.merge(task)


def unmerge_mtl_lora(model: nn.Module):
    for m in mtl_layers(model):
        m.unmerge()


def mixing_weights(model: nn.Module) -> dict:
    """{layer name: p (T, n)}, the softmax(w / tau) mixing of the up-projections, fp32, detached."""
    return {name: m.mixing().detach() for name, m in model.named_modules()
            if isinstance(m, MTLLoRALinear)}


def mtl_state_dict(model: nn.Module) -> dict:
    """Only the adapter tensors (lora_A, lora_lambda, lora_B, lora_w), detached, for torch.save."""
    return {f"{name}.{k}".lstrip("."): v.detach().clone()
            for name, m in model.named_modules() if isinstance(m, MTLLoRALinear)
            for k, v in m.state_dict().items() if k.startswith("lora_")}


def load_mtl_state_dict(model: nn.Module, state: dict):
    """Load adapter tensors saved by mtl_state_dict into a model adapted with the same settings."""
    if any(m.merged_task is not None for m in mtl_layers(model)):
        raise ValueError("the model has merged MTL-LoRA layers; unmerge_mtl_lora(model) first")
    own = mtl_state_dict(model)
    if not own:
        raise ValueError("the model has no MTL-LoRA layers: call add_mtl_lora(model, ...) first")
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise ValueError(f"adapter keys do not match this model: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}; were targets the same when it was saved?")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{k}: saved shape {tuple(v.shape)} != model's {tuple(own[k].shape)} "
                             "(were r, n_up, n_tasks and diagonal the same?)")
    model.load_state_dict(state, strict=False)
