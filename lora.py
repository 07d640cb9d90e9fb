"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, arXiv 2106.09685).

A frozen linear layer W0 (d_out x d_in) gets a trainable low-rank update, per token x:

    h = W0 x + s * B A drop(x)        A: r x d_in,  B: d_out x r,  s = alpha / r

What trains: A and B, r * (d_in + d_out) parameters per layer instead of d_in * d_out.
Init (paper): A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0, so at step 0
the adapted model computes exactly what the base computes.
Merging: W = W0 + s B A serves the adapted model at plain nn.Linear cost; unmerge() takes it out.

What alpha means: the update is scaled by s = alpha / r. With Adam each step of B A grows with s,
so alpha acts as a learning-rate multiplier for the adapter that stays put when r changes.
Defaults: r = 8, alpha = 16 (s = 2; peft's usual setting; the paper set alpha = r), dropout 0.

Usage on any model built of nn.Linear layers (no edits to its code):

    import torch, lora
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    names = lora.add_lora(model, targets=["0", "2"], r=4)   # ['0', '2']; only A, B train now
    torch.save(lora.lora_state_dict(model), "adapter.pt")   # adapter tensors only
    model = lora.merge_and_unload_lora(model)               # plain nn.Linear layers, W0 + s B A

Our choices and the limits of this file are listed at its end.
"""
import math
import numbers
import warnings

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 fp32_adapter: bool = True):
        super().__init__()
        _check_hparams(base, r, alpha, dropout)
        kw = dict(device=base.weight.device, dtype=_adapter_dtype(base, fp32_adapter))
        self.base = base.requires_grad_(False)                      # W0, frozen
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kw)    # A: (r, d_in)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kw)   # B: (d_out, r)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        _folded_buffers(self, "A", "B")    # the A, B that merge() folded into W0 (empty: unmerged)
        self.reset_parameters()

    def reset_parameters(self):
        """The paper's init, A ~ kaiming_uniform(a=sqrt(5)) and B = 0 (also after to_empty();
        model.apply() calls it after the sub-layers' own reset, as it must)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):                                           # x (..., d_in)
        h = self.base(x)                                            # W0 x: (..., d_out)
        if self.merged:                                             # W0 already holds s B A
            return _merged_output(self, h)
        z = self.lora_A(self.drop(x.to(self.lora_A.weight.dtype)))  # z = A drop(x): (..., r)
        Bt = self.lora_B.weight.t().contiguous().to(h.dtype)        # B^T: (r, d_out), contiguous
        # h + s * B z, as one fused matmul-add over the tokens: (M, d_out) + s (M, r) @ (r, d_out)
        h2 = torch.addmm(h.reshape(-1, h.shape[-1]), z.reshape(-1, self.r).to(h.dtype), Bt,
                         alpha=self.scaling)
        return h2.view(h.shape)

    @property
    def merged(self):
        return self.folded_A.numel() > 0

    def delta_weight(self, A=None, B=None):                         # s B A: (d_out, d_in), fp32
        A = self.lora_A.weight if A is None else A
        B = self.lora_B.weight if B is None else B
        return (self.scaling * (B.float() @ A.float())).to(self.base.weight.device)

    @torch.no_grad()
    def merge(self):
        """W = W0 + s B A (merging twice is a no-op)."""
        _refuse_quantized([self], "merge_and_unload_lora")
        if not self.merged:
            self.folded_A, self.folded_B = (self.lora_A.weight.clone(), self.lora_B.weight.clone())
            W = self.base.weight
            W.copy_((W.float() + self.delta_weight(self.folded_A, self.folded_B)).to(W.dtype))

    @torch.no_grad()
    def unmerge(self):
        """W0 = W - s B A, with the A and B that were merged."""
        if self.merged:
            W = self.base.weight
            W.copy_((W.float() - self.delta_weight(self.folded_A, self.folded_B)).to(W.dtype))
            _folded_buffers(self)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def _check_hparams(base, r, alpha, dropout):
    if base is not None and not isinstance(base, nn.Linear):
        raise ValueError(f"LoRALinear wraps an nn.Linear, got a {type(base).__name__}")
    if not (_is_int(r, 1) and _is_num(alpha, 1e-30, 1e30) and _is_num(dropout, 0, 1)):
        raise ValueError(f"LoRA needs an integer rank r >= 1, a number alpha in (0, 1e30) (s = "
                         f"alpha / r) and dropout in [0, 1); got r={r!r}, alpha={alpha!r}, "
                         f"dropout={dropout!r}")


def add_lora(model: nn.Module, targets=("q", "k", "v", "o", "up", "down"), r: int = 8,
             alpha: float = 16.0, dropout: float = 0.0, fp32_adapter: bool = True) -> list:
    """Wrap, in place, every nn.Linear whose dotted name ends with a target; freeze every parameter
    that is not an adapter's (the adapters of earlier add_* calls, of any file, keep their state).
    Returns the wrapped names."""
    _check_hparams(None, r, alpha, dropout)
    return _adapt(model, targets, lambda base: LoRALinear(base, r, alpha, dropout, fp32_adapter))


def lora_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module):
    _refuse_quantized(lora_layers(model), "merge_and_unload_lora")     # before any change
    for m in lora_layers(model):
        m.merge()


def unmerge_lora(model: nn.Module):
    for m in lora_layers(model):
        m.unmerge()


def merge_and_unload_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer and put its nn.Linear (W0 + s B A) back in its place: a plain model
    with the same outputs. Returns the model (in place; a bare LoRALinear gives its nn.Linear)."""
    merge_lora(model)
    return _unload(model, LoRALinear)


def lora_state_dict(model: nn.Module) -> dict:
    """Only the adapter tensors (lora_A / lora_B weights), detached, ready for torch.save."""
    return {f"{n}.{k}".lstrip("."): v.detach().clone() for n, m in model.named_modules()
            if isinstance(m, LoRALinear)
            for k, v in m.state_dict().items() if k.startswith("lora_")}


def load_lora_state_dict(model: nn.Module, state: dict):
    """Load adapter tensors saved by lora_state_dict into a model adapted with the same settings."""
    _load_adapters(model, state, lora_state_dict(model), lora_layers(model), "add_lora")

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
# - Layout is HF peft's: `lora_A` = nn.Linear(d_in, r), `lora_B` = nn.Linear(r, d_out), bias-free
#   (weights r x d_in and d_out x r); the wrapped layer is `.base`. Targets match the end of a
#   layer's dotted name, as in peft; a layer reachable under two names (tied) is wrapped once.
# - Dtypes: on a bf16/fp16 base the adapter is fp32 by default, as in peft (in half precision
#   small updates are lost to rounding); fp32_adapter=False keeps the base's dtype. x is cast to
#   the adapter's dtype and the update to the output's, so autocast works.
# - A quantized base (an nn.Linear with an integer weight: bitsandbytes' Linear4bit, Linear8bitLt,
#   as transformers loads them; QLoRA) gets fp32 adapters too (fp32_adapter=False: the layer's
#   compute dtype); no bitsandbytes import. Merging into it is refused before any change (the
#   packed weight cannot take a float update): dequantize first (transformers'
#   model.dequantize(dtype=torch.float32)), then merge and unload.
# - merge() forms s B A in fp32 and casts once; in bf16, merge then unmerge restores W0 only to
#   bf16 rounding (peft has the same limit). A merged layer keeps the A and B it folded in as
#   buffers (folded_A, folded_B), so unmerge() is exact even if they change, and a merged model
#   saves (torch.save, HF save_pretrained, Trainer checkpoints) and reloads exactly.
# - A merged layer does not use its adapter: training it warns (the adapter gets no gradient).
# - add_lora freezes every parameter that is not an adapter's, a classification head too (as peft
#   does without modules_to_save): set requires_grad_(True) on what should train besides.
# - Only nn.Linear: HF GPT-2's Conv1D (weight stored transposed) is refused, not adapted.
# - nn.MultiheadAttention's out_proj is refused: MHA reads its weight directly, an adapter there
#   would do nothing. nn.TransformerEncoder's inference fast paths also read linear1.weight
#   directly; add_lora switches them off in the encoders it adapts.
# - rsLoRA's s = alpha / sqrt(r) is a known variant, not used here.
