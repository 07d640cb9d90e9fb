"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, arXiv 2106.09685).

A frozen linear layer W0 (d_out x d_in) gets a trainable low-rank update:

    h = W0 x + s * B A drop(x)        A: r x d_in,  B: d_out x r,  s = alpha / r

Only A and B train: r * (d_in + d_out) parameters per layer instead of d_in * d_out.
A starts as kaiming_uniform(a=sqrt(5)) (the nn.Linear default, U(-1/sqrt(d_in), 1/sqrt(d_in)))
and B starts at zero, so at step 0 the adapted model computes exactly what the base computes.

What alpha means: the update is scaled by s = alpha / r. With Adam the size of each step in
B A scales with s, so alpha plays the role of a learning-rate multiplier for the adapter that
stays put when you change r (train.py uses alpha = 2r, i.e. s = 2; this file's default is the
common r=8, alpha=16; the paper used alpha = r or a fixed alpha and did not tune it). rsLoRA's alpha / sqrt(r) is a known variant, not used.

Layout (HF peft's): `lora_A` is nn.Linear(d_in, r), `lora_B` is nn.Linear(r, d_out), both
bias-free, so their weights are r x d_in and d_out x r. The wrapped layer lives in `.base`.

Merging: W = W0 + s * B A folds the update into the frozen weight (zero inference cost);
`unmerge()` subtracts it again. The product is formed in fp32 and cast once, so a bf16 base
weight loses no more than one rounding. Merging an already merged layer is a no-op.

Dtypes: the adapters are created in the base weight's dtype. The input is cast to the adapter's
dtype and the update back to the output's, so autocast works, and so do fp32 adapters on a bf16
model: after add_lora, call `.float()` on each layer's lora_A and lora_B (recommended for bf16
training: a bf16 adapter loses small updates to rounding).

Usage on any model built of nn.Linear layers (no edits to its code):

    import torch, lora
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    names = lora.add_lora(model, targets=["0", "2"], r=4)   # ['0', '2']; only A, B train now
    torch.save(lora.lora_state_dict(model), "adapter.pt")   # adapter tensors only
    lora.merge_lora(model)                                  # for deployment: plain nn.Linear cost
"""
import math

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        _check_hparams(r, alpha, dropout)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRALinear wraps an nn.Linear, got a {type(base).__name__}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        d_in, d_out = base.in_features, base.out_features
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(d_in, r, bias=False, **kw)   # weight (r, d_in)
        self.lora_B = nn.Linear(r, d_out, bias=False, **kw)  # weight (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.merged = False

    def forward(self, x):                                    # x (..., d_in)
        out = self.base(x)                                   # (..., d_out)
        if self.merged:
            return out
        z = self.lora_A(self.drop(x.to(self.lora_A.weight.dtype)))   # (..., r)
        # out + s * B z in one fused matmul-add: no separate scale and add passes over (..., d_out)
        B = self.lora_B.weight.to(out.dtype)                         # (d_out, r)
        h = torch.addmm(out.reshape(-1, out.shape[-1]), z.reshape(-1, self.r).to(out.dtype), B.t(),
                        alpha=self.scaling)
        return h.view(out.shape)

    def delta_weight(self):                                  # (d_out, d_in), fp32
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    @torch.no_grad()
    def merge(self):
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
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def _check_hparams(r, alpha, dropout):
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be an integer >= 1, got {r!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0 (scaling is alpha / r), got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


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


def add_lora(model: nn.Module, targets=("q", "k", "v", "o", "up", "down"),
             r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> list:
    """Wrap, in place, every nn.Linear whose dotted name ends with a target; freeze the rest."""
    _check_hparams(r, alpha, dropout)
    names = _find_targets(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
        if isinstance(parent, nn.TransformerEncoderLayer):
            # its inference fast path reads linear1.weight itself and would skip the adapter;
            # any hook on a sub-module turns that path off
            getattr(parent, child).register_forward_pre_hook(_keep_off_fast_path)
    return names


def _keep_off_fast_path(module, args):
    return None


def lora_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module):
    for m in lora_layers(model):
        m.merge()


def unmerge_lora(model: nn.Module):
    for m in lora_layers(model):
        m.unmerge()


def lora_state_dict(model: nn.Module) -> dict:
    """Only the adapter tensors (lora_A / lora_B weights), detached, ready for torch.save."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def load_lora_state_dict(model: nn.Module, state: dict):
    """Load adapter tensors saved by lora_state_dict into a model adapted with the same settings."""
    if any(m.merged for m in lora_layers(model)):
        raise ValueError("the model has merged LoRA layers; unmerge_lora(model) before loading")
    own = lora_state_dict(model)
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if not own:
        raise ValueError("the model has no LoRA layers: call add_lora(model, ...) first")
    if missing or extra:
        raise ValueError(f"adapter keys do not match this model: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}; were targets the same when it was saved?")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{k}: saved shape {tuple(v.shape)} != model's {tuple(own[k].shape)}"
                             " (was the rank the same?)")
    model.load_state_dict(state, strict=False)
