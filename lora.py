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
rsLoRA's alpha / sqrt(r) is a known variant, not used here.

Usage on any model built of nn.Linear layers (no edits to its code):

    import torch, lora
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    names = lora.add_lora(model, targets=["0", "2"], r=4)   # ['0', '2']; only A, B train now
    torch.save(lora.lora_state_dict(model), "adapter.pt")   # adapter tensors only
    lora.merge_lora(model)                                  # for deployment: plain nn.Linear cost

Our choices and the limits of this file:
- Layout is HF peft's: `lora_A` = nn.Linear(d_in, r), `lora_B` = nn.Linear(r, d_out), bias-free
  (weights r x d_in and d_out x r); the wrapped layer is `.base`. Targets match the end of a
  layer's dotted name, as in peft.
- Dtypes: the adapter is made in the base weight's dtype; x is cast to the adapter's dtype and
  the update to the output's, so autocast works, and so do fp32 adapters on a bf16 model (call
  `.float()` on lora_A and lora_B: a bf16 adapter loses small updates to rounding).
- merge() forms s B A in fp32 and casts once; in bf16, merge then unmerge restores W0 only to
  bf16 rounding (peft has the same limit). A merged layer keeps the A and B it folded in, also in
  its state_dict, so unmerge() is exact even if they change, and a merged model reloads exactly.
- Only nn.Linear: HF GPT-2's Conv1D (weight stored transposed) is refused, not adapted.
- nn.MultiheadAttention's out_proj is refused: MHA reads its weight directly, an adapter there
  would do nothing. nn.TransformerEncoder's inference fast paths also read linear1.weight
  directly; add_lora switches them off in the encoders it adapts.
"""
import math

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        _check_hparams(base, r, alpha, dropout)
        self.base = base.requires_grad_(False)                      # W0, frozen
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kw)    # A: (r, d_in)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kw)   # B: (d_out, r)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.folded = None                  # (A, B) that merge() folded into W0, else None
        self.reset_parameters()

    def reset_parameters(self):
        """The paper's init, A ~ kaiming_uniform(a=sqrt(5)) and B = 0 (also after to_empty();
        model.apply() calls it after the sub-layers' own reset, as it must)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):                                           # x (..., d_in)
        h = self.base(x)                                            # W0 x: (..., d_out)
        if self.merged:                                             # W0 already holds s B A
            return h
        z = self.lora_A(self.drop(x.to(self.lora_A.weight.dtype)))  # z = A drop(x): (..., r)
        Bt = self.lora_B.weight.t().contiguous().to(h.dtype)        # B^T: (r, d_out), contiguous
        # h + s * B z, as one fused matmul-add over the tokens: (M, d_out) + s (M, r) @ (r, d_out)
        h2 = torch.addmm(h.reshape(-1, h.shape[-1]), z.reshape(-1, self.r).to(h.dtype), Bt,
                         alpha=self.scaling)
        return h2.view(h.shape)

    @property
    def merged(self):
        return self.folded is not None

    def delta_weight(self, A=None, B=None):                         # s B A: (d_out, d_in), fp32
        A = self.lora_A.weight if A is None else A
        B = self.lora_B.weight if B is None else B
        dW = self.scaling * (B.float() @ A.float())
        return dW.to(self.base.weight.device)             # `folded` may sit elsewhere after .to()

    @torch.no_grad()
    def merge(self):
        """W = W0 + s B A (merging twice is a no-op)."""
        if not self.merged:
            self.folded = (self.lora_A.weight.detach().clone(), self.lora_B.weight.detach().clone())
            W = self.base.weight
            W.copy_((W.float() + self.delta_weight(*self.folded)).to(W.dtype))

    @torch.no_grad()
    def unmerge(self):
        """W0 = W - s B A, with the A and B that were merged."""
        if self.merged:
            W = self.base.weight
            W.copy_((W.float() - self.delta_weight(*self.folded)).to(W.dtype))
            self.folded = None

    def get_extra_state(self):              # the merged state travels with the state_dict
        return self.folded

    def set_extra_state(self, state):
        self.folded = state

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def _check_hparams(base, r, alpha, dropout):
    if not isinstance(base, nn.Linear):
        raise ValueError(f"LoRALinear wraps an nn.Linear, got a {type(base).__name__}")
    if not (isinstance(r, int) and r >= 1 and 0 < alpha < 1e30 and 0 <= dropout < 1):
        raise ValueError(f"LoRA needs an integer rank r >= 1, alpha in (0, 1e30) (s = alpha / r) "
                         f"and dropout in [0, 1); got r={r!r}, alpha={alpha!r}, dropout={dropout!r}")


def _find_targets(model: nn.Module, targets):
    """Dotted names of the nn.Linear layers whose name ends with one of `targets` (peft-style)."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    modules = dict(model.named_modules())
    found = [n for n in modules if any(n == t or n.endswith("." + t) for t in targets)]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in found)]
    if not targets or unmatched:
        linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        raise ValueError(f"targets {unmatched or targets} match no layer of the model; name "
                         f"some of its nn.Linear layers (by the end of their names): {linears[:20]}")
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


def add_lora(model: nn.Module, targets=("q", "k", "v", "o", "up", "down"),
             r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> list:
    """Wrap, in place, every nn.Linear whose dotted name ends with a target; freeze every
    parameter that is not an adapter's. Returns the wrapped names."""
    names = _find_targets(model, targets)
    new = {n: LoRALinear(model.get_submodule(n), r, alpha, dropout) for n in names}  # all checked
    adapters = {id(p) for m in lora_layers(model) + list(new.values())
                for k, p in m.named_parameters() if k.startswith("lora_")}
    for p in model.parameters():
        if id(p) not in adapters:
            p.requires_grad_(False)
    for name, layer in new.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    _keep_off_fast_paths(model)
    return names


def _keep_off_fast_paths(model):
    """nn.TransformerEncoder(Layer)'s inference fast paths read linear1.weight themselves and
    would crash on or skip an adapter: the nested-tensor path is turned off by a flag, the
    layer's fused path by any hook (here a no-op one)."""
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and lora_layers(m):
            m.use_nested_tensor = False
        if isinstance(m, nn.TransformerEncoderLayer):
            for layer in lora_layers(m):
                if not layer._forward_pre_hooks:
                    layer.register_forward_pre_hook(lambda module, args: None)


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
    return {f"{n}.{k}".lstrip("."): v.detach().clone() for n, m in model.named_modules()
            if isinstance(m, LoRALinear) for k, v in m.state_dict().items() if k.startswith("lora_")}


def load_lora_state_dict(model: nn.Module, state: dict):
    """Load adapter tensors saved by lora_state_dict into a model adapted with the same settings."""
    own = lora_state_dict(model)
    if not own or any(m.merged for m in lora_layers(model)):
        raise ValueError("load into an adapted, unmerged model: add_lora(model, ...) first, "
                         "unmerge_lora(model) if merged")
    bad = sorted(k for k in own.keys() | state.keys()
                 if k not in own or k not in state or own[k].shape != state[k].shape)
    if bad:
        raise ValueError(f"adapter tensors do not fit this model at {bad[:4]}: missing, "
                         "unexpected or of another shape; were targets and rank the same?")
    model.load_state_dict(state, strict=False)
