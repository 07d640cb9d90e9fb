"""Fine-tune a small pre-trained transformer on a tiny multi-task benchmark with one method.

    python train.py --method align              # pre-trains and caches the base once, then adapts it
    python train.py --method mtl --suite interference --rank 2
    torchrun --standalone --nproc_per_node=2 train.py --method lora     # data parallel

Sections: command line; data; model; adapting a model for a method; training; evaluation; main.
A run writes <out>/<suite>-<method>-seed<seed>[-<flag><value>...]/ (every setting you changed is
in the name): metrics.json, adapter.pt (the adapter's weights) and ckpt.pt (to resume or extend).
"""
import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import align_lora
import lora
import mtl_lora
import multihead_lora
import spurious_reg

# ----------------------------------------------------------------------------- command line
METHODS = ["none", "full", "lora", "multihead", "mtl", "align", "spurious"]
METHOD_FLAGS = {"multihead": ["lora_heads", "no_router", "init"], "mtl": ["n_up", "temperature", "diagonal"],
                "align": ["align_loss", "align_weight"], "spurious": ["modules", "decorr_weight",
                "sparsity_weight", "invariance_weight", "invariance_warmup", "env_tasks"]}
ADAPTER_FLAGS = ["rank", "alpha", "dropout", "targets"]            # every method but none and full
RANGES = {"lr": (1e-7, 1.0), "align_weight": (0, 1e4), "decorr_weight": (0, 1e4), "sparsity_weight": (0, 1e4),
          "invariance_weight": (0, 1e4), "invariance_warmup": (0, 1)}   # the adapters' are the method files'
NOT_RESULTS = ["resume", "ckpt_every", "out", "base", "name"]       # change nothing a run computes


class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):          # every default shown; None ones are in the help
        return action.help if action.default is None else super()._get_help_string(action)


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    a = p.add_argument
    a("--method", default="lora", choices=METHODS, help="none: the base as is; full: full fine-tuning")
    a("--suite", default="default", choices=["default", "interference"], help="the tasks to adapt to")
    a("--steps", type=int, default=1000, help="adaptation steps")
    a("--batch", type=int, default=256, help="samples per step (all processes together)")
    a("--lr", type=float, default=None, help="peak learning rate (default 3e-3; full: 1e-3)")
    a("--warmup", type=int, default=50, help="linear warm-up steps, then cosine decay to 10%%")
    a = p.add_argument_group("adapters (every method but none and full)").add_argument
    a("--rank", type=int, default=8, help="adapter rank r (multihead: of each head)")
    a("--alpha", type=float, default=None, help="scaling s = alpha / r (default 2r)")
    a("--dropout", type=float, default=None, help="adapter dropout (default 0; multihead --no-router: 0.05)")
    a("--targets", default="q,k,v,o,up,down", help="linear layers to adapt: q k v o (attention) up down (MLP)")
    a = p.add_argument_group("multihead: HydraLoRA, or M-LoRA with --no-router").add_argument
    a("--lora-heads", type=int, default=3, help="adapter heads B_i (N)")
    a("--no-router", action="store_true", help="M-LoRA: the mean of the heads, no router")
    a("--init", default="zero", choices=["zero", "offset"], help="M-LoRA's heads: zero, or random "
      "with the start subtracted (the Align-LoRA authors')")
    a = p.add_argument_group("mtl: MTL-LoRA").add_argument
    a("--n-up", type=int, default=3, help="shared up-projections B_i (n)")
    a("--temperature", type=float, default=0.1, help="tau of p_t = softmax(w_t / tau) (the authors')")
    a("--diagonal", action="store_true", help="diagonal task transforms Lam_t")
    a = p.add_argument_group("align: Align-LoRA").add_argument
    a("--align-loss", default="kl", choices=["kl", "mmd"], help="the alignment loss")
    a("--align-weight", type=float, default=0.2, help="lambda of L_task + lambda * L_align")
    a = p.add_argument_group("spurious: MT-CRL").add_argument
    a("--modules", type=int, default=4, help="modules K (chunks of the final hidden state)")
    a("--decorr-weight", type=float, default=0.01, help="weight of the decorrelation loss")
    a("--sparsity-weight", type=float, default=0.01, help="weight of the graph's L1")
    a("--invariance-weight", type=float, default=10.0, help="weight of the IRMv1 penalty")
    a("--invariance-warmup", type=float, default=0.3, help="fraction of the steps before it starts")
    a("--env-tasks", default="has7", choices=["has7", "all"], help="samples that carry an environment: "
      "has7's, or every task's (random ids for the others)")
    a = p.add_argument_group("model, base and data").add_argument
    a("--width", type=int, default=64, help="model width")
    a("--layers", type=int, default=3, help="transformer blocks")
    a("--attn-heads", type=int, default=4, help="attention heads")
    a("--base-steps", type=int, default=1500, help="pre-training steps of the base")
    a("--rho", default="0.8,0.95", help="has7's two training environments: how often the first "
      "digit's feature agrees with its label (0.1 on the shifted test split)")
    a = p.add_argument_group("running").add_argument
    a("--seed", type=int, default=0, help="seed of the adapter init and the training data")
    a("--eval-samples", type=int, default=1000, help="evaluation samples per task and split")
    a("--out", default="out", help="folder of the run folders")
    a("--base", default=os.path.join("out", "base.pt"), help="the cached base model")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when present")
    a("--autocast", default="auto", choices=["auto", "bf16", "off"], help="bf16 autocast (auto: on CUDA)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--resume", action="store_true", help="continue this run's checkpoint, or extend a finished "
      "run with the same settings to more --steps")
    a("--ckpt-every", type=int, default=250, help="checkpoint every N steps (0: at the end only)")
    return p


def get_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    default = p.parse_args(["--method", args.method] + ["--no-router"] * args.no_router)
    given = [k for k, v in vars(args).items() if v != getattr(default, k)]    # the flags typed
    # the defaults that depend on other flags
    args.lr = args.lr or (1e-3 if args.method == "full" else 3e-3)
    args.alpha = 2.0 * args.rank if args.alpha is None else args.alpha
    args.dropout = (0.05 if args.method == "multihead" and args.no_router else 0.0) \
        if args.dropout is None else args.dropout
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    args.autocast = ("bf16" if args.device == "cuda" else "off") if args.autocast == "auto" else args.autocast
    try:
        args.rho = tuple(float(r) for r in args.rho.split(","))
    except ValueError:
        p.error(f"--rho takes two comma-separated numbers, e.g. 0.8,0.95; got {args.rho!r}")
    for k, (lo, hi) in RANGES.items():
        if not lo <= getattr(args, k) <= hi:
            p.error(f"--{k.replace('_', '-')} must be a number in [{lo:g}, {hi:g}], got {getattr(args, k)}")
    if min(args.steps, args.batch, args.width, args.layers, args.attn_heads, args.base_steps,
           args.eval_samples, args.warmup + 1, args.ckpt_every + 1) < 1:
        p.error("--steps, --batch, --width, --layers, --attn-heads, --base-steps and --eval-samples "
                "must be >= 1; --warmup and --ckpt-every >= 0")
    own = METHOD_FLAGS.get(args.method, []) + (ADAPTER_FLAGS if args.method not in ("none", "full") else [])
    alien = [k for k in ADAPTER_FLAGS + sum(METHOD_FLAGS.values(), []) if k not in own and k in given]
    if alien:
        p.error(f"{' '.join('--' + k.replace('_', '-') for k in alien)}: not a setting of --method "
                f"{args.method}; drop it, or pick the method it belongs to")
    if len(args.rho) != 2 or not all(0 <= r <= 1 for r in args.rho) or args.width % args.attn_heads:
        p.error("--rho takes two numbers in [0, 1] (e.g. 0.8,0.95); --width must divide by --attn-heads")
    if args.batch % WORLD or args.batch // WORLD < len(SUITES[args.suite]):
        p.error(f"--batch is global: it must divide by the {WORLD} processes and give each at least "
                f"one sample of each of the {len(SUITES[args.suite])} tasks")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no CUDA device")
    keep = NOT_RESULTS + ["method", "suite", "seed", "no_router", "device", "autocast", "compile"]
    args.name = "-".join([args.suite, args.method + "-norouter" * args.no_router, f"seed{args.seed}"]
                         + [flag_text(k, getattr(args, k)) for k in given if k not in keep]
                         + [f"procs{WORLD}"] * (WORLD > 1))
    return args


def flag_text(k, v):                                 # e.g. rank2, targets-q+v, diagonal
    v = "+".join(map(str, v)) if isinstance(v, (list, tuple)) else "" if v is True else f"{v:g}" \
        if isinstance(v, float) else str(v)
    return k.replace("_", "-") + v


def settings(args):
    """Every setting that changes what a run computes (the run folder's name has the non-default ones)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()
            if k not in NOT_RESULTS} | {"processes": WORLD}

# ----------------------------------------------------------------------------- data
# A sample is [task] x1..xL [SEP] y1..ym: digit tokens 0-9, then SEP, PAD and one token per task.
# Sequence tasks answer L digits; classification tasks answer one digit (0/1), then PAD.
# The model reads seq[:-1] and predicts seq[1:]; the loss counts answer tokens only.


SEP, PAD = 10, 11
TASKS = ["copy", "reverse", "sort", "inc", "first_ge5", "has7", "sort_desc", "dec", "rotate"]
VOCAB = 12 + len(TASKS)
SUITES = {"pretrain": ["copy", "reverse"],
          "default": ["sort", "inc", "first_ge5", "has7"],                # A = first_ge5, B = has7
          "interference": ["sort", "sort_desc", "inc", "dec", "rotate"]}  # opposite pulls, same inputs
CLASSIFY = {"first_ge5", "has7"}
ANSWER = {   # x (n, L) digits -> answer (n, L) or label (n,)
    "copy": lambda x: x, "reverse": lambda x: x.flip(1),
    "sort": lambda x: x.sort(1).values, "sort_desc": lambda x: x.sort(1, descending=True).values,
    "inc": lambda x: (x + 1) % 10, "dec": lambda x: (x + 9) % 10, "rotate": lambda x: x.roll(-1, 1),
    "first_ge5": lambda x: (x[:, 0] >= 5).long(), "has7": lambda x: (x == 7).any(1).long(),
}
SPLIT_SEED = {"train": 1, "val": 2, "test": 3}
L, RHO_SHIFT, NOISE = 8, 0.1, 0.25              # digits per input; has7's shifted agreement, noise
BASE_LR, BASE_BATCH = 3e-3, 256                 # pre-training of the base


def data_seed(split, seed, step=0):
    return (SPLIT_SEED[split] * 1_000_003 + seed) * 1_000_003 + step


def make_batch(tasks, n, seed, L=L, rho=(0.8, 0.95), rho_shift=RHO_SHIFT, noise=NOISE, shifted=False,
               device="cpu", env_tasks="has7"):
    """n samples mixing `tasks` evenly (task = i % len(tasks)), made on `device` from one seed.

    Returns idx (n, 2L+1) inputs; targets (n, 2L+1), -100 where there is no answer token;
    clean (n, 2L+1), the targets with has7's clean label; task (n,) index into `tasks`;
    env (n,): has7's training environment 0 / 1 (rho[0] / rho[1]), 2 on the shifted split, and
    -1 (no environment) for the other tasks' samples (env_tasks="all": their random 0 / 1 draw).

    has7 (task B) is built like Colored MNIST: clean label y = "contains a 7"; the training label
    flips y with prob. `noise`; the first digit is then drawn so that first_ge5's feature (A:
    "first digit >= 5") equals the noisy label with prob. rho[env]. Reading it is a shortcut.
    """
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    rand = lambda *shape: torch.rand(shape, generator=g, device=device)
    digit = lambda lo, hi, *shape: torch.randint(lo, hi, shape, generator=g, device=device)
    task = torch.arange(n, device=device) % len(tasks)                # (n,) an even mix
    env = digit(0, 2, n) if not shifted else torch.full((n,), 2, device=device)
    x = digit(0, 10, n, L)                                            # (n, L)
    is_b = torch.zeros(n, 1, dtype=torch.bool, device=device)
    if "has7" in tasks:
        y = rand(n) < 0.5                                             # clean label
        xb = digit(0, 9, n, L)
        xb = xb + (xb >= 7).long()                                    # digits without a 7
        rows, pos = torch.arange(n, device=device), digit(1, L, n)
        xb[rows, pos] = torch.where(y, 7, xb[rows, pos])              # one 7 when y
        y_noisy = y ^ (rand(n) < noise)
        rho_e = torch.where(env == 0, rho[0], torch.where(env == 1, rho[1], rho_shift))   # (n,)
        a = y_noisy ^ (rand(n) >= rho_e)                              # A's feature agrees w.p. rho
        high = digit(0, 4, n)
        high = high + 5 + (high >= 2).long()                          # 5, 6, 8 or 9 (no 7)
        xb[:, 0] = torch.where(a, high, digit(0, 5, n))
        is_b = (task == tasks.index("has7"))[:, None]
        x = torch.where(is_b, xb, x)
    if env_tasks == "has7":
        env = torch.where(is_b[:, 0], env, -1)
    ans, task_tok = torch.full((n, L), PAD, device=device), torch.zeros_like(task)
    for i, t in enumerate(tasks):                                     # a few tasks, all vectorized
        out = ANSWER[t](x)
        if t in CLASSIFY:
            out = torch.cat([out[:, None], ans[:, 1:]], 1)
        ans = torch.where((task == i)[:, None], out, ans)
        task_tok = torch.where(task == i, 12 + TASKS.index(t), task_tok)
    sep = torch.full((n, 1), SEP, device=device)
    seq = torch.cat([task_tok[:, None], x, sep, ans], 1)              # (n, 2L+2)
    clean = seq[:, 1:].clone()
    clean[:, :L + 1] = -100
    clean[clean == PAD] = -100
    targets = clean.clone()
    if "has7" in tasks:
        targets[:, L + 1] = torch.where(is_b[:, 0], y_noisy.long(), clean[:, L + 1])
    return dict(idx=seq[:, :-1], targets=targets, clean=clean, task=task, env=env)


def batch_for(args, tasks, n, split, step=0, shifted=False, seed=None, rank=0):
    """A batch of `split` (train: a fresh one per step and process; val and test: fixed draws)."""
    seed = (args.seed if seed is None else seed) if split == "train" else 0
    return make_batch(tasks, n, data_seed(split, seed, step) + (rank << 50), L, args.rho,
                      RHO_SHIFT, NOISE, shifted, args.device, args.env_tasks)

# ----------------------------------------------------------------------------- model


@dataclass
class GPTConfig:
    vocab: int = VOCAB
    block: int = 17
    width: int = 64
    layers: int = 3
    heads: int = 4


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        d = c.width
        self.heads = c.heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):                                             # x (B, T, d)
        B, T, d = x.shape
        h = self.ln1(x)
        q, k, v = (m(h).view(B, T, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # (B, heads, T, d/heads)
        x = x + self.o(y.transpose(1, 2).reshape(B, T, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.config = c
        self.tok, self.pos = nn.Embedding(c.vocab, c.width), nn.Embedding(c.block, c.width)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, c.vocab, bias=False)

    def features(self, idx):                                          # idx (B, T) -> (B, T, d)
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, idx):                                           # -> logits (B, T, vocab)
        return self.head(self.features(idx))


def model_config(args):
    return GPTConfig(VOCAB, 2 * L + 1, args.width, args.layers, args.attn_heads)

# ----------------------------------------------------------------------------- adapting a model


class TaskModel(nn.Module):
    """The GPT with a method's adapters, plus what the method wires around it: MTL-LoRA's layers
    read each sample's task id; MT-CRL's graph gates the final hidden state before the head.
    forward(idx, task) -> (logits, final hidden state)."""

    def __init__(self, gpt, crl=None, task_aware=False):
        super().__init__()
        self.gpt, self.crl, self.task_aware = gpt, crl, task_aware

    def forward(self, idx, task):
        if self.task_aware:
            with mtl_lora.task_ids(self.gpt, task):
                h = self.gpt.features(idx)                            # (B, T, d)
        else:
            h = self.gpt.features(idx)
        return self.gpt.head(h if self.crl is None else self.crl(h, task)), h


def build_model(args, base_state=None, n_tasks=None):
    """The base (random weights if base_state is None: to check the settings) with the method's
    adapters; a bad adapter setting stops with the method file's message."""
    torch.manual_seed(args.seed)
    gpt, n_tasks = GPT(model_config(args)), n_tasks or len(SUITES[args.suite])
    if base_state is not None:
        gpt.load_state_dict(base_state)
    hp, m, crl = dict(r=args.rank, alpha=args.alpha, dropout=args.dropout), args.method, None
    try:
        if m == "none":
            gpt.requires_grad_(False)
        elif m in ("lora", "align", "spurious"):
            lora.add_lora(gpt, args.targets, **hp)
        elif m == "multihead":
            multihead_lora.add_multihead_lora(gpt, args.targets, n_heads=args.lora_heads,
                                              router=not args.no_router, init=args.init, **hp)
        elif m == "mtl":
            mtl_lora.add_mtl_lora(gpt, n_tasks, args.targets, n_up=args.n_up, tau=args.temperature,
                                  diagonal=args.diagonal, **hp)
        if m == "spurious":
            crl = spurious_reg.MTCRL(args.width, n_tasks, args.modules)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    return TaskModel(gpt, crl, task_aware=m == "mtl").to(args.device)


def regularizer(model, args, tasks, steps):
    """The method's extra loss term, (step, batch, logits, h) -> scalar, or None."""
    if args.method == "align":
        align = align_lora.AlignmentLoss(model.gpt, len(tasks), kind=args.align_loss)   # hooks lora_A
        return lambda step, b, logits, h: args.align_weight * align(b["task"], b["idx"] != PAD)
    if args.method != "spurious":
        return None
    crl = model.crl

    def reg(step, b, logits, h):
        answer = b["targets"] != -100                                      # (B, T)
        tok = F.cross_entropy(logits.float().transpose(1, 2), b["targets"], reduction="none")
        risk = tok.sum(1) / answer.sum(1)                                  # (B,) per-sample risk
        loss = args.decorr_weight * crl.decorrelation(h, answer) + args.sparsity_weight * crl.sparsity()
        w = spurious_reg.warmup_weight(step, steps, args.invariance_weight, args.invariance_warmup)
        return loss + w * crl.invariance(risk, b["task"], b["env"]) if w > 0 else loss
    return reg


def adapter_state(model, method):
    if method == "full":
        return dict(model.gpt.state_dict())
    get = {"multihead": multihead_lora.multihead_state_dict, "mtl": mtl_lora.mtl_state_dict,
           "none": lambda m: {}}.get(method, lora.lora_state_dict)
    crl = {} if model.crl is None else {f"crl.{k}": v for k, v in model.crl.state_dict().items()}
    return get(model.gpt) | crl

# ----------------------------------------------------------------------------- training
# Under torchrun (WORLD > 1) each process trains on its share of every global batch, drawn with
# its own seed; DDP averages the gradients; process 0 alone prints and writes files.
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
HINTS = {"mtl": ", --temperature", "align": ", --align-weight",
         "spurious": ", --invariance-weight, --decorr-weight"}


def log(*a, **kw):
    if RANK == 0:
        print(*a, **kw)


def save_atomic(obj, path, save=torch.save):
    """Written whole or not at all (temp file + rename), by process 0 only."""
    if RANK == 0:
        save(obj, path + ".tmp")
        os.replace(path + ".tmp", path)


def lr_at(step, steps, warmup, peak):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)                      # 0 -> 1 after the warm-up
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))    # cosine decay to 10%


def train(model, args, tasks, steps, lr, desc, ckpt=None, info=None, start=None, seed=None,
          batch=None, extra=None):
    """AdamW on the trainable parameters, warm-up + cosine, clipping; `extra(step, batch, logits,
    h)` is added to the loss. Writes the checkpoint `ckpt` (with `info`, the settings) every
    --ckpt-every steps and at the end; `start`: a checkpoint to continue from.
    Returns (steps/s, [(step, loss) every 25 steps])."""
    seed, batch = args.seed if seed is None else seed, batch or args.batch
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return 0.0, []
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    if WORLD > 1:
        torch.manual_seed(seed + 1_000_003 * RANK)                   # each process its own dropout
    step0, losses = 0, []
    if start is not None:
        model.load_state_dict(start["trainable"], strict=False)
        opt.load_state_dict(start["opt"])
        torch.set_rng_state(start["rng"].cpu())
        if start.get("cuda_rng") is not None and args.device.startswith("cuda"):
            torch.cuda.set_rng_state(start["cuda_rng"].cpu())
        step0, losses = start["step"], start["losses"]
    if args.compile:              # the body only: MT-CRL's penalty differentiates head and graph twice
        torch._dynamo.reset()     # a fresh cache: dynamo's guards can miss align's hooks on lora_A
        model.gpt.features = torch.compile(model.gpt.features)        # and reuse an older graph
    fwd = nn.parallel.DistributedDataParallel(model) if WORLD > 1 else model
    autocast = torch.autocast(args.device.split(":")[0], torch.bfloat16, enabled=args.autocast == "bf16")
    model.train()
    t0 = time.perf_counter()
    for step in (bar := tqdm(range(step0, steps), desc, total=steps, initial=step0, disable=RANK != 0)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.warmup, lr)
        b = batch_for(args, tasks, batch // WORLD, "train", step, seed=seed, rank=RANK)
        with autocast:
            logits, h = fwd(b["idx"], b["task"])
        loss = F.cross_entropy(logits.float().flatten(0, 1), b["targets"].flatten())
        if extra is not None:
            loss = loss + extra(step, b, logits, h)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        save = ckpt and (step + 1 == steps or args.ckpt_every and (step + 1) % args.ckpt_every == 0)
        if (step + 1) % 25 == 0 or step + 1 == steps or save:      # a host read: not every step
            value = loss.detach()
            if WORLD > 1:
                torch.distributed.all_reduce(value)                  # the global batch's loss
            value = value.item() / WORLD
            if not math.isfinite(value):
                raise SystemExit(f"error: the loss became {value} by step {step + 1} of {desc}: "
                                 f"lower --lr or --alpha{HINTS.get(args.method, '')}, or raise --warmup")
            losses.append((step + 1, value))
            bar.set_postfix(loss=f"{value:.4f}")
        if save:
            trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
            save_atomic(dict(step=step + 1, settings=info, trainable=trained, losses=losses,
                             opt=opt.state_dict(), rng=torch.get_rng_state(), cuda_rng=torch.cuda.
                             get_rng_state() if args.device.startswith("cuda") else None), ckpt)
    model.eval()
    return (steps - step0) / max(time.perf_counter() - t0, 1e-9), losses

# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, args, tasks):
    """Exact-match accuracy per task (every answer token the arg-max under teacher forcing) against
    clean labels, on the validation draw ("val", for tuning), the test draw ("test") and the
    shifted test draw ("shift": has7's shortcut reversed; the other tasks' data does not shift).
    "shortcut": what answering has7 from the first digit alone scores."""
    out, n = {}, args.eval_samples * len(tasks)
    for split, data, shifted in [("val", "val", False), ("test", "test", False), ("shift", "test", True)]:
        b = batch_for(args, tasks, n, data, shifted=shifted)
        right = torch.cat([((model(i, t)[0].argmax(-1) == c) | (c == -100)).all(1)
                           for i, t, c in zip(*(b[k].split(2048) for k in ("idx", "task", "clean")))])
        acc = torch.zeros(len(tasks), device=args.device).index_add_(0, b["task"], right.float())
        out[split] = dict(zip(tasks, (acc / torch.bincount(b["task"], minlength=len(tasks))).tolist()))
        if "has7" in tasks:
            is_b = b["task"] == tasks.index("has7")
            guess = (b["idx"][is_b, 1] >= 5).long()
            out[split]["shortcut"] = (guess == b["clean"][is_b, L + 1]).float().mean().item()
    return out


@torch.no_grad()
def examples(model, args, tasks, k=2):
    """k test samples per task: the input, the expected answer and the model's."""
    b = batch_for(args, tasks, k * len(tasks), "test")
    pred, lines = model(b["idx"], b["task"])[0].argmax(-1), []
    for i in b["task"].argsort(stable=True).tolist():
        keep = b["clean"][i] != -100                                     # the answer tokens
        want, got = b["clean"][i][keep].tolist(), pred[i][keep].tolist()
        lines.append(f"  {tasks[b['task'][i]]:<10} {' '.join(map(str, b['idx'][i, 1:L + 1].tolist()))}"
                     f"  ->  {' '.join(map(str, want))}   model: {' '.join(map(str, got))}"
                     + ("" if got == want else "   (wrong)"))
    return "examples (test draw: input -> expected answer, the model's answer):\n" + "\n".join(lines)


@torch.no_grad()
def diagnostics(model, args, tasks):
    """What the method learned (layer means): multi-head LoRA's head similarity and routing (task x
    head), MTL-LoRA's p_t (task x up-projection), MT-CRL's graph (task x module)."""
    out = {}
    if args.method == "multihead":
        sim = multihead_lora.head_similarity(model.gpt)                 # nan: undefined
        out["head_similarity"] = {k: None if math.isnan(v) else v for k, v in sim.items()}
        if not args.no_router:
            b = batch_for(args, tasks, 200 * len(tasks), "test")
            with multihead_lora.record_routing(model.gpt) as rec:
                model(b["idx"], b["task"])
            out["routing"] = multihead_lora.routing_table(rec, b["task"], len(tasks), b["idx"] != PAD).tolist()
    if args.method == "mtl":
        out["mixing_weights"] = torch.stack(list(mtl_lora.mixing_weights(model.gpt).values())).mean(0).tolist()
    if model.crl is not None:
        out["graph"] = model.crl.gates().tolist()
    text = []
    if "head_similarity" in out:
        v = torch.tensor(list(sim.values()))
        text.append(f"head similarity (mean pairwise cosine of the flattened B_i, per layer): mean "
                    f"{v.nanmean():.3f}, min {v.min():.3f}, max {v.max():.3f}")
    for key, title in [("routing", "mean routing weight, task x head B_i"),
                       ("mixing_weights", f"p_t = softmax(w_t / {args.temperature}), task x up-projection B_i"),
                       ("graph", "MT-CRL graph g = sigmoid(G), task x module h_k")]:
        if key in out:
            text += [title + ":"] + [f"  {t:<12}" + "".join(f"{v:8.3f}" for v in row)
                                     for t, row in zip(tasks, out[key])]
    return "\n".join(text), out


def report(acc, tasks):
    lines = [f"{'task':<12}{'val':>8}{'test':>8}{'shifted':>9}"]
    for t in tasks + ["shortcut"] * ("has7" in tasks):
        shift = f"{acc['shift'][t]:>9.1%}" if t in ("has7", "shortcut") else f"{'-':>9}"
        lines.append(f"{t:<12}{acc['val'][t]:>8.1%}{acc['test'][t]:>8.1%}{shift}")
    return "\n".join(lines + ["(shortcut: has7 answered from the first digit alone)"] * ("has7" in tasks))

# ----------------------------------------------------------------------------- main


def load(path, what):
    """torch.load that fails in one line naming the file."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(obj, dict) and "settings" in obj
        return obj
    except Exception as e:
        raise SystemExit(f"error: cannot read {what} {path} ({type(e).__name__}: it is truncated, "
                         f"empty or not written by train.py); delete it and run again")


def differ(saved, now, ignore=()):
    return {k: (saved.get(k), v) for k, v in now.items() if k not in ignore and saved.get(k) != v}


def get_base(args):
    """The pre-trained base from --base, or pre-trained now (checkpointed, resumed) and cached."""
    want = dict(model=asdict(model_config(args)), tasks=SUITES["pretrain"], steps=args.base_steps,
                lr=BASE_LR, batch=BASE_BATCH)
    if os.path.exists(args.base):
        saved = load(args.base, "the cached base")
        if differ(saved["settings"], want):
            raise SystemExit(f"error: the cached base {args.base} was trained with other settings "
                             f"(cached vs now: {differ(saved['settings'], want)}); pass another "
                             f"--base, or delete {args.base} to pre-train a new one")
        return saved["state_dict"]
    ckpt = args.base + ".ckpt"
    start = load(ckpt, "the base's checkpoint") if os.path.exists(ckpt) else None
    if start and differ(start["settings"], want):
        raise SystemExit(f"error: {ckpt} is a checkpoint of a base with other settings; delete it")
    log(f"pre-training the base on {want['tasks']} ({args.base_steps} steps"
        + (f", resumed at step {start['step']})" if start else ")") + f"; cached in {args.base}")
    torch.manual_seed(0)
    model = TaskModel(GPT(model_config(args))).to(args.device)
    base_args = argparse.Namespace(**vars(args) | dict(warmup=50))   # not the adaptation's
    train(model, base_args, SUITES["pretrain"], args.base_steps, BASE_LR, "base", ckpt, want, start,
          seed=0, batch=BASE_BATCH)
    acc = evaluate(model, args, SUITES["pretrain"])
    log("base: " + ", ".join(f"{t} {a:.1%}" for t, a in acc["test"].items()))
    state = {k: v.cpu() for k, v in model.gpt.state_dict().items()}
    save_atomic(dict(settings=want, state_dict=state, accuracy=acc), args.base)
    if RANK == 0:
        os.remove(ckpt)
    return state


def resume_point(args, run_dir):
    """The checkpoint to continue: this run's own, else one of a run with the same training settings
    and at most as many steps (extending a finished run). Names the settings that differ."""
    ignore, now = ("eval_samples", "device", "compile"), settings(args)
    own = os.path.join(run_dir, "ckpt.pt")
    if os.path.exists(own):
        ck = load(own, "the checkpoint")
        if differ(ck["settings"], now, ignore):
            raise SystemExit(f"error: {own} was written with other settings (then vs now: "
                             f"{differ(ck['settings'], now, ignore)}); drop --resume or change them back")
        return ck
    prefix = args.name.split(f"-seed{args.seed}")[0] + f"-seed{args.seed}"
    found = [(ck["step"], d, ck) for d in os.listdir(args.out) if d.startswith(prefix)
             and os.path.exists(p := os.path.join(args.out, d, "ckpt.pt")) and (ck := load(p, "the checkpoint"))
             and ck["step"] <= args.steps and not differ(ck["settings"], now, ignore + ("steps",))]
    if not found:
        raise SystemExit(f"error: nothing to resume: {run_dir} has no checkpoint, and no run in "
                         f"{args.out} has these settings with at most {args.steps} steps; drop --resume")
    step, d, ck = max(found, key=lambda f: f[0])
    log(f"continuing {os.path.join(args.out, d)} (step {step}) to {args.steps} steps")
    return ck


def run(args, reuse=False):
    """One run: check everything a user can get wrong, pre-train or load the base, adapt, train,
    evaluate, write the run folder. reuse: return a finished run's metrics instead of refusing."""
    tasks, t0 = SUITES[args.suite], time.perf_counter()
    run_dir = os.path.join(args.out, args.name)
    done = os.path.join(run_dir, "metrics.json")
    try:                                                  # every check before the long part
        for d in (run_dir, os.path.dirname(args.base) or "."):
            os.makedirs(d, exist_ok=True)
            probe = os.path.join(d, f".writable{RANK}")            # one per process: no race
            open(probe, "w").close()
            os.remove(probe)
    except OSError as e:
        raise SystemExit(f"error: cannot write the run folder or the base: {e}")
    if os.path.exists(done):
        saved = json.load(open(done))
        if differ(saved["settings"], settings(args)):
            raise SystemExit(f"error: {run_dir} holds a run with other settings (there vs now: "
                             f"{differ(saved['settings'], settings(args))}); pass another --out")
        if args.resume and not reuse:
            raise SystemExit(f"error: nothing to resume: {run_dir} is finished; more --steps extend it")
        log(f"{run_dir} already holds this run (delete it to train again; --resume with more "
            f"--steps extends it):\n{report(saved['accuracy'], tasks)}")
        return saved
    if os.path.exists(os.path.join(run_dir, "ckpt.pt")) and not args.resume:
        raise SystemExit(f"error: {run_dir} holds an unfinished run: pass --resume to continue it, "
                         "or delete the folder to start over")
    start = resume_point(args, run_dir) if args.resume else None
    n_train = sum(p.numel() for p in build_model(args).parameters() if p.requires_grad)
    base = get_base(args)
    model, n_base = build_model(args, base), sum(v.numel() for v in base.values())
    log(f"{args.name}: {n_train:,} trainable parameters ({n_train / n_base:.2%} of the base's {n_base:,})"
        + (f"; warning: --rank {args.rank} is above the width {args.width}" if args.rank > args.width else ""))
    extra = regularizer(model, args, tasks, args.steps)
    speed, losses = train(model, args, tasks, args.steps, args.lr, args.method,
                          os.path.join(run_dir, "ckpt.pt"), settings(args), start, extra=extra)
    acc = evaluate(model, args, tasks)
    text, learned = diagnostics(model, args, tasks)
    log("\n".join([report(acc, tasks), examples(model, args, tasks)] + ([text] if text else [])))
    metrics = dict(name=args.name, method=args.method, suite=args.suite, seed=args.seed,
                   trainable=n_train, base_params=n_base, accuracy=acc, learned=learned, losses=losses,
                   loss=losses[-1][1] if losses else None, steps_per_s=speed, total_s=time.perf_counter() - t0,
                   settings=settings(args))
    save_atomic(adapter_state(model, args.method), os.path.join(run_dir, "adapter.pt"))
    save_atomic(json.dumps(metrics, indent=1), done, lambda o, p: open(p, "w").write(o))
    log(f"wrote {run_dir}/: metrics.json, adapter.pt, ckpt.pt; {speed:.1f} steps/s, "
        f"{metrics['total_s']:.0f}s in all")
    return metrics


if __name__ == "__main__":
    args = get_args()
    if WORLD > 1:                                         # launched by torchrun: one process per rank
        cuda = args.device == "cuda"
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
    try:
        run(args)
    finally:
        if WORLD > 1:
            torch.distributed.destroy_process_group()
