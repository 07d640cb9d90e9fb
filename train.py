"""Train and compare multi-task LoRA methods on a tiny multi-task benchmark.

    python train.py --method align           # pre-trains (once) and caches the base, then adapts it
    python train.py --method all --seeds 3   # every method, one table (also --suite interference)
    torchrun --standalone --nproc_per_node=2 train.py --method lora   # data parallel (gloo / nccl)

Sections, top to bottom: command line; the tiny multi-task data; the small transformer;
building a model for a method; training; evaluation; main. Runs on CUDA (bf16 autocast) when
present, else on the CPU.
"""
import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import align_lora
import lora
import mtl_lora
import multihead_lora
import spurious_reg

# ----------------------------------------------------------------------------- command line
# Under torchrun (WORLD_SIZE > 1) every process trains on its share of each global batch; DDP
# averages the gradients; process 0 alone prints and writes files.
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))


def log(*a, **kw):
    if RANK == 0:
        print(*a, **kw)


METHODS = ["none", "full", "lora", "multihead", "mtl", "align", "spurious", "all"]
ALL = ["none", "full", "lora", "multihead", "multihead --no-router", "mtl", "align", "spurious"]
DEFAULT_LR = {"full": 1e-3}       # every other method: 3e-3


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    a = p.add_argument
    a("--method", default="lora", choices=METHODS, help="the method to train; all: every one")
    a("--suite", default="default", choices=["default", "interference"], help="task suite to adapt to")
    a("--steps", type=int, default=1000, help="adaptation steps")
    a("--batch", type=int, default=256, help="samples per step, mixed over the suite's tasks")
    a("--lr", type=float, default=None, help="peak learning rate (default 3e-3; full: 1e-3)")
    a("--warmup", type=int, default=50, help="linear warm-up steps, then cosine decay to 10%%")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--clip", type=float, default=1.0, help="gradient-norm clipping")
    a("--rank", type=int, default=8, help="adapter rank r (multihead: of each head)")
    a("--alpha", type=float, default=None, help="adapter scaling numerator: s = alpha / r (default 2r)")
    a("--dropout", type=float, default=None, help="adapter dropout (default 0; multihead --no-router: 0.05)")
    a("--targets", default="q,k,v,o,up,down", help="comma-separated linear-layer names to adapt")
    # method-specific (see each method file's docstring)
    a("--heads", type=int, default=3, help="multihead: number of B heads N")
    a("--no-router", action="store_true", help="multihead: M-LoRA (mean of heads) instead of HydraLoRA")
    a("--n-up", type=int, default=3, help="mtl: shared up-projections n")
    a("--temperature", type=float, default=0.5, help="mtl: softmax temperature tau of the mixing")
    a("--diagonal", action="store_true", help="mtl: diagonal task transform Lam_t")
    a("--align-loss", default="kl", choices=["kl", "mmd"], help="align: the alignment loss")
    a("--align-weight", type=float, default=0.2, help="align: lambda in L_task + lambda * L_align")
    a("--modules", type=int, default=4, help="spurious: MT-CRL modules K (chunks of the final state)")
    a("--decorr-weight", type=float, default=0.01, help="spurious: weight of the decorrelation loss")
    a("--sparsity-weight", type=float, default=0.01, help="spurious: weight of the graph's L1")
    a("--invariance-weight", type=float, default=10.0,
      help="spurious: weight of the invariance penalty (chosen on the val draw: benchmarks/tune_spurious.py)")
    a("--invariance", default="irm", choices=["irm", "var"],
      help="spurious: IRMv1 or the variance of the risk gradients")
    a("--invariance-warmup", type=float, default=0.3, help="spurious: fraction of steps before it starts")
    # model and pre-training of the base
    a("--width", type=int, default=64, help="model width")
    a("--layers", type=int, default=3, help="transformer blocks")
    a("--attn-heads", type=int, default=4, help="attention heads")
    a("--seq-len", type=int, default=8, help="digits per input (L)")
    a("--base-steps", type=int, default=1500, help="pre-training steps of the base")
    a("--base-lr", type=float, default=3e-3, help="pre-training learning rate")
    a("--base-batch", type=int, default=256, help="pre-training samples per step")
    # the confounded pair
    a("--rho", default="0.8,0.95", help="training environments: agreement of A's feature with B's label")
    a("--rho-shift", type=float, default=0.1, help="agreement rate of the shifted test split")
    a("--noise", type=float, default=0.25, help="label noise of task B in training")
    # running
    a("--seed", type=int, default=0, help="seed of adapter init and training data")
    a("--eval-samples", type=int, default=1000, help="test samples per task and split")
    a("--out", default="out", help="output folder (the cached base lives here too)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--compile", action="store_true", help="torch.compile the model")
    a("--seeds", type=int, default=1, help="--method all: seeds per method (--seed, --seed+1, ...)")
    a("--resume", action="store_true", help="continue from the run's last checkpoint")
    a("--ckpt-every", type=int, default=250, help="checkpoint every N steps (0: never)")
    args = p.parse_args(argv)

    def bad(msg):
        p.error(msg)
    try:
        args.rho = tuple(float(r) for r in args.rho.split(","))
    except ValueError:
        bad(f"--rho must be comma-separated numbers, e.g. 0.8,0.95; got {args.rho!r}")
    for name, v in [("--rho", min(args.rho)), ("--rho", max(args.rho)),
                    ("--rho-shift", args.rho_shift), ("--noise", args.noise)]:
        if not 0 <= v <= 1:
            bad(f"{name} values must lie in [0, 1]")
    if len(args.rho) != 2:
        bad("--rho takes exactly two training environments, e.g. 0.8,0.95")
    args.alpha = 2.0 * args.rank if args.alpha is None else args.alpha
    if args.dropout is None:   # M-LoRA's heads start equal and differ only through dropout
        args.dropout = 0.05 if args.method == "multihead" and args.no_router else 0.0
    for name in ["steps", "batch", "base_batch", "base_steps", "rank", "width", "layers", "attn_heads",
                 "seq_len", "eval_samples", "heads", "n_up", "modules", "seeds"]:
        if getattr(args, name) < 1:
            bad(f"--{name.replace('_', '-')} must be >= 1")
    if args.seq_len < 2:
        bad("--seq-len must be >= 2 (task B places a 7 after the first digit)")
    if args.width % args.attn_heads:
        bad(f"--width {args.width} must be divisible by --attn-heads {args.attn_heads}")
    if args.width % args.modules:
        bad(f"--width {args.width} must be divisible by --modules {args.modules}")
    if not 0 <= args.dropout < 1:
        bad(f"--dropout must lie in [0, 1); got {args.dropout}")
    if not 0 <= args.invariance_warmup <= 1:
        bad("--invariance-warmup is a fraction of the steps, in [0, 1]")
    if args.lr is None:
        args.lr = DEFAULT_LR.get(args.method, 3e-3)
    for name in ["lr", "base_lr", "alpha", "temperature", "clip"]:
        if not 0 < getattr(args, name) < math.inf:
            bad(f"--{name.replace('_', '-')} must be a number > 0")
    for name in ["align_weight", "decorr_weight", "sparsity_weight", "invariance_weight",
                 "weight_decay", "warmup", "ckpt_every"]:
        if not 0 <= getattr(args, name) < math.inf:
            bad(f"--{name.replace('_', '-')} must be a number >= 0")
    if args.batch // WORLD < len(SUITES[args.suite]):
        bad(f"--batch {args.batch} is too small: every process needs at least one sample of each "
            f"of the {len(SUITES[args.suite])} tasks per step")
    args.targets = [t for t in args.targets.split(",") if t]
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        bad("--device cuda asked for, but torch sees no CUDA device")
    if args.device == "cuda" and WORLD > 1:
        args.device = f"cuda:{LOCAL_RANK}"                            # one GPU per process
    if args.batch % WORLD or args.base_batch % WORLD:
        bad(f"--batch {args.batch} and --base-batch {args.base_batch} are global batches: "
            f"they must be divisible by the {WORLD} processes")
    return args

# ----------------------------------------------------------------------------- data
# A sample is [task] x1..xL [SEP] y1..ym: digit tokens 0-9, then SEP, PAD and one token per task.
# Sequence tasks answer L digits; classification tasks answer one digit (0/1), then PAD.
# The model reads seq[:-1] and predicts seq[1:]; the loss counts answer tokens only.

SEP, PAD = 10, 11
TASKS = ["copy", "reverse", "sort", "inc", "first_ge5", "has7",
         "sort_desc", "dec", "rotate"]
VOCAB = 12 + len(TASKS)
SUITES = {
    "pretrain": ["copy", "reverse"],
    "default": ["sort", "inc", "first_ge5", "has7"],                # A = first_ge5, B = has7
    "interference": ["sort", "sort_desc", "inc", "dec", "rotate"],  # opposite pulls, same inputs
}
CLASSIFY = {"first_ge5", "has7"}
ANSWER = {   # x (n, L) digits -> answer (n, L) or label (n,)
    "copy": lambda x: x, "reverse": lambda x: x.flip(1),
    "sort": lambda x: x.sort(1).values, "sort_desc": lambda x: x.sort(1, descending=True).values,
    "inc": lambda x: (x + 1) % 10, "dec": lambda x: (x + 9) % 10, "rotate": lambda x: x.roll(-1, 1),
    "first_ge5": lambda x: (x[:, 0] >= 5).long(), "has7": lambda x: (x == 7).any(1).long(),
}
SPLIT_SEED = {"train": 1, "val": 2, "test": 3}


def data_seed(split, seed, step=0):
    return (SPLIT_SEED[split] * 1_000_003 + seed) * 1_000_003 + step


def make_batch(tasks, n, seed, L=8, rho=(0.8, 0.95), rho_shift=0.1, noise=0.25,
               shifted=False, device="cpu"):
    """n samples mixing `tasks` evenly, all made on `device` from one seeded generator.

    Returns idx (n, 2L+1) inputs; targets (n, 2L+1), -100 where there is no answer token;
    clean (n, 2L+1), the targets with task B's clean label; task (n,) index into `tasks`;
    env (n,) 0/1: the training environment (rho[0] / rho[1]), 2 on the shifted split.

    Task B (has7) is built like Colored MNIST: clean label y = "contains a 7"; the training label
    flips y with prob. `noise`; the first digit is then drawn so that A's feature "first digit
    >= 5" equals the noisy label with prob. rho[env]. Reading the first digit is a shortcut.
    """
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    rand = lambda *shape: torch.rand(shape, generator=g, device=device)
    digit = lambda lo, hi, *shape: torch.randint(lo, hi, shape, generator=g, device=device)
    task = torch.arange(n, device=device) % len(tasks)                # (n,) an even mix
    env = digit(0, 2, n) if not shifted else torch.full((n,), 2, device=device)
    x = digit(0, 10, n, L)                                            # (n, L)
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


def batch_for(args, tasks, n, split, step=0, shifted=False):
    seed = data_seed(split, args.seed if split == "train" else 0, step)
    return make_batch(tasks, n, seed, args.seq_len, args.rho, args.rho_shift, args.noise,
                      shifted, args.device)

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
        self.tok = nn.Embedding(c.vocab, c.width)
        self.pos = nn.Embedding(c.block, c.width)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, c.vocab, bias=False)
        self.crl = None        # MT-CRL's graph (spurious_reg.MTCRL) between features and head
        self.task_aware = False   # MTL-LoRA layers need the batch's task ids

    def features(self, idx):                                          # idx (B, T) -> (B, T, d)
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, idx):                                           # -> logits (B, T, vocab)
        return self.head(self.features(idx))

# ----------------------------------------------------------------------------- building a model


def model_config(args):
    return GPTConfig(VOCAB, 2 * args.seq_len + 1, args.width, args.layers, args.attn_heads)


def base_settings(args):
    return dict(model=asdict(model_config(args)), tasks=SUITES["pretrain"], steps=args.base_steps,
                lr=args.base_lr, batch=args.base_batch)


def get_base(args):
    """The pre-trained base: loaded from the cache in --out, or pre-trained now and cached."""
    path = os.path.join(args.out, "base.pt")
    want = base_settings(args)
    if os.path.exists(path):
        saved = torch.load(path, map_location="cpu")
        if saved["settings"] != want:
            diff = {k: (saved["settings"].get(k), v) for k, v in want.items()
                    if saved["settings"].get(k) != v}
            raise SystemExit(f"error: the cached base {path} was trained with other settings "
                             f"(cached vs now: {diff}). Use another --out, or delete {path} "
                             "to pre-train a new base.")
        return saved["state_dict"]
    log(f"pre-training the base on {want['tasks']} ({args.base_steps} steps); "
          f"cached in {path} for later runs")
    torch.manual_seed(0)
    model = GPT(model_config(args)).to(args.device)
    train(model, args, SUITES["pretrain"], args.base_steps, args.base_lr, "base", seed=0,
          batch=args.base_batch)
    acc = evaluate(model, args, SUITES["pretrain"])
    log("base: " + ", ".join(f"{t} {a:.1%}" for t, a in acc["id"].items()))
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    save_atomic(dict(settings=want, state_dict=state, accuracy=acc), path)
    return state


def build_model(args, base_state, n_tasks):
    """The base with the method's adapters (and, for spurious, MT-CRL's graph as `model.crl`)."""
    torch.manual_seed(args.seed)
    model = GPT(model_config(args))
    model.load_state_dict(base_state)
    m, hp = args.method, dict(r=args.rank, alpha=args.alpha, dropout=args.dropout)
    try:
        if m == "none":
            model.requires_grad_(False)
        elif m in ("lora", "align", "spurious"):
            lora.add_lora(model, args.targets, **hp)
        elif m == "multihead":
            multihead_lora.add_multihead_lora(model, args.targets, n_heads=args.heads,
                                              router=not args.no_router, **hp)
        elif m == "mtl":
            mtl_lora.add_mtl_lora(model, n_tasks, args.targets, n_up=args.n_up, tau=args.temperature,
                                  diagonal=args.diagonal, **hp)
            model.task_aware = True
        if m == "spurious":
            model.crl = spurious_reg.MTCRL(args.width, n_tasks, args.modules)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    return model.to(args.device)


def logits_for(model, idx, task):
    """Logits (B, T, vocab) for a batch of (possibly mixed) tasks, and the final hidden state
    (B, T, d) when MT-CRL's graph gates it before the head (else None). MTL-LoRA's layers read
    the task ids from a context manager; the model's forward signature stays (idx) -> logits."""
    if model.crl is not None:
        h = model.features(idx)
        return model.head(model.crl(h, task)), h
    if model.task_aware:
        with mtl_lora.task_ids(model, task):
            return model(idx), None
    return model(idx), None


class Forward(nn.Module):
    """logits_for as a module, so that DDP can wrap it and average gradients in backward."""
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx, task):
        return logits_for(self.model, idx, task)


def regularizer(model, args, steps):
    """The method's extra loss term, (step, batch, logits, h) -> scalar, or None."""
    if args.method == "align":
        align = align_lora.AlignmentLoss(model, kind=args.align_loss)   # hooks on every lora_A

        def align_reg(step, b, logits, h):
            return args.align_weight * align(b["task"], b["idx"] != PAD)
        align_reg.remove = align.remove
        return align_reg
    if args.method != "spurious":
        return None
    crl = model.crl

    def reg(step, b, logits, h):
        answer = b["targets"] != -100                                      # (B, T)
        tok = F.cross_entropy(logits.float().transpose(1, 2), b["targets"], reduction="none")
        risk = tok.sum(1) / answer.sum(1)                                  # (B,) per-sample risk
        loss = args.decorr_weight * crl.decorrelation(h, answer) + args.sparsity_weight * crl.sparsity()
        w = spurious_reg.warmup_weight(step, steps, args.invariance_weight, args.invariance_warmup)
        if w > 0:
            loss = loss + w * crl.invariance(risk, b["task"], b["env"], kind=args.invariance)
        return loss
    return reg


def adapter_state(model, method):
    if method == "full":
        return dict(model.state_dict())
    state = {"lora": lora.lora_state_dict, "align": lora.lora_state_dict,
             "spurious": lora.lora_state_dict, "multihead": multihead_lora.multihead_state_dict,
             "mtl": mtl_lora.mtl_state_dict}.get(method, lambda m: {})(model)
    if model.crl is not None:
        state.update({f"crl.{k}": v for k, v in model.crl.state_dict().items()})
    return state


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

# ----------------------------------------------------------------------------- training


def save_atomic(obj, path, save=torch.save):
    """Written whole or not at all (temp file + rename), by process 0 only."""
    if RANK != 0:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def finite(obj):
    """obj with every NaN / inf float replaced by None (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def write_text(text, path):
    save_atomic(text, path, lambda t, p: Path(p).write_text(t))


def lr_at(step, steps, warmup, peak):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(model, args, tasks, steps, lr, desc, seed=None, batch=None, ckpt_path=None, resume=False,
          extra=None):
    """AdamW on the trainable parameters, warm-up + cosine, clipping; `extra(step, batch, logits,
    h)` is added to the loss (a method's regularizer). --batch is the global batch: under
    torchrun each process draws its share with its own seed. Returns (steps/s, last loss)."""
    seed = args.seed if seed is None else seed
    batch = batch or args.batch
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return 0.0, float("nan")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    start = 0
    settings = {k: v for k, v in vars(args).items()
                if k not in ("resume", "ckpt_every", "compile", "device")}
    if WORLD > 1:
        torch.manual_seed(seed + 1_000_003 * RANK)                    # own dropout masks
    if resume and ckpt_path and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location=args.device, weights_only=False)
        if ck["settings"] != settings:
            raise SystemExit(f"error: {ckpt_path} was written by a run with other settings; "
                             "rerun without --resume to start over")
        model.load_state_dict(ck["trainable"], strict=False)
        opt.load_state_dict(ck["opt"])
        torch.set_rng_state(ck["rng"].cpu())
        if ck.get("cuda_rng") is not None and args.device.startswith("cuda"):
            torch.cuda.set_rng_state(ck["cuda_rng"].cpu())
        start = ck["step"]
        log(f"resumed {desc} from step {start} ({ckpt_path})")
    fwd = Forward(model)
    if WORLD > 1:
        fwd = nn.parallel.DistributedDataParallel(fwd)
    fwd = torch.compile(fwd) if args.compile else fwd
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=args.device.startswith("cuda"))
    model.train()
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, mininterval=1.0,
               disable=RANK != 0)
    t0 = time.perf_counter()
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.warmup, lr)
        b = make_batch(tasks, batch // WORLD, data_seed("train", seed, step) + (RANK << 50),
                       args.seq_len, args.rho, args.rho_shift, args.noise, device=args.device)
        with autocast:
            logits, h = fwd(b["idx"], b["task"])
        loss = F.cross_entropy(logits.float().flatten(0, 1), b["targets"].flatten())
        if extra is not None:
            loss = loss + extra(step, b, logits, h)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        ckpt_now = ckpt_path and args.ckpt_every and (step + 1) % args.ckpt_every == 0 and step + 1 < steps
        if step == 0 or (step + 1) % 25 == 0 or step == steps - 1 or ckpt_now:   # syncs a GPU: not
            value = loss.detach()                                     # every step; before every checkpoint
            if WORLD > 1:
                dist.all_reduce(value)                                # the global batch's loss
                value = value / WORLD
            value = value.item()
            if not math.isfinite(value):
                raise SystemExit(f"error: loss became {value} by step {step} of {desc} (checked "
                                 "every 25 steps); try a lower --lr or a larger --warmup")
            bar.set_postfix(loss=f"{value:.4f}")
        if ckpt_now:
            trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
            save_atomic(dict(step=step + 1, settings=settings, trainable=trained, opt=opt.state_dict(),
                             rng=torch.get_rng_state(), cuda_rng=torch.cuda.get_rng_state()
                             if args.device.startswith("cuda") else None), ckpt_path)
    bar.close()
    model.eval()
    return (steps - start) / max(time.perf_counter() - t0, 1e-9), value

# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, args, tasks, n=None):
    """Exact-match accuracy per task (every answer token the arg-max under teacher forcing),
    against clean labels, on the in-distribution test draw ("id") and the shifted one ("shift"),
    and on an in-distribution validation draw ("val", for tuning: the shifted split is not)."""
    n = (n or args.eval_samples) * len(tasks)
    model.eval()
    out = {}
    for split, shifted in [("id", False), ("shift", True), ("val", False)]:
        if shifted and "has7" not in tasks:                           # only has7's data shifts
            out[split] = out["id"]
            continue
        b = batch_for(args, tasks, n, "val" if split == "val" else "test", shifted=shifted)
        correct = torch.cat([((logits_for(model, i, t)[0].argmax(-1) == c) | (c == -100)).all(1)
                             for i, t, c in zip(*(b[k].split(2048) for k in ("idx", "task", "clean")))])
        acc = torch.zeros(len(tasks), device=args.device).index_add_(0, b["task"], correct.float())
        acc = acc / torch.bincount(b["task"], minlength=len(tasks))
        out[split] = {t: acc[i].item() for i, t in enumerate(tasks)}
        if "has7" in tasks:                    # what reading only the first digit would score
            is_b = b["task"] == tasks.index("has7")
            guess = (b["idx"][is_b, 1] >= 5).long()
            out[split]["shortcut"] = (guess == b["clean"][is_b, args.seq_len + 1]).float().mean().item()
    return out


@torch.no_grad()
def diagnostics(model, args, tasks):
    """What each method learned, as text and as numbers: multi-head LoRA's head similarity and
    routing (task x head), MTL-LoRA's mixing weights p_t (task x up-projection), MT-CRL's graph
    (task x module). Averages over the adapted layers."""
    def table(rows, cols, m):
        head = f"{'':<12}" + "".join(f"{c:>8}" for c in cols)
        return "\n".join([head] + [f"{r:<12}" + "".join(f"{v:>8.3f}" for v in row)
                                     for r, row in zip(rows, m.tolist())])
    text, out = [], {}
    if args.method == "multihead":
        sim = multihead_lora.head_similarity(model)
        out["head_similarity"] = sim
        vals = torch.tensor(list(sim.values()))
        text.append(f"head similarity (mean off-diagonal cosine of the flattened B_i per layer): "
                    f"mean {vals.nanmean():.3f}, min {vals.min():.3f}, max {vals.max():.3f}")
        if not args.no_router:
            b = batch_for(args, tasks, 200 * len(tasks), "test")
            with multihead_lora.record_routing(model) as rec:
                logits_for(model, b["idx"], b["task"])
            m = multihead_lora.routing_table(rec, b["task"], len(tasks), b["idx"] != PAD)
            out["routing"] = m.tolist()
            text.append("mean routing weight, task x head (tokens and layers averaged):\n"
                        + table(tasks, [f"B_{i}" for i in range(m.shape[1])], m))
    if args.method == "mtl":
        p = torch.stack(list(mtl_lora.mixing_weights(model).values())).mean(0)   # (T, n)
        out["mixing_weights"] = p.tolist()
        text.append(f"mixing weights p_t = softmax(w_t / {args.temperature}), task x up-projection "
                    "(mean over layers):\n" + table(tasks, [f"B_{i}" for i in range(p.shape[1])], p))
    if model.crl is not None:
        g = model.crl.gates()
        out["graph"] = g.tolist()
        text.append("MT-CRL graph g = sigmoid(G), task x module:\n"
                    + table(tasks, [f"h_{k}" for k in range(g.shape[1])], g))
    return "\n".join(text), out


def report(acc, tasks):
    lines = [f"{'task':<12}{'in-dist':>9}{'shifted':>9}"]
    for t in tasks:
        shifted = f"{acc['shift'][t]:>9.1%}" if t == "has7" else f"{'-':>9}"
        lines.append(f"{t:<12}{acc['id'][t]:>9.1%}{shifted}")
    if "shortcut" in acc["id"]:
        lines.append(f"{'(shortcut)':<12}{acc['id']['shortcut']:>9.1%}{acc['shift']['shortcut']:>9.1%}"
                     "   <- has7 answered from the first digit alone")
    return "\n".join(lines)

# ----------------------------------------------------------------------------- main


def run(args):
    tasks = SUITES[args.suite]
    t0 = time.perf_counter()
    base_state = get_base(args)
    model = build_model(args, base_state, len(tasks))
    n_base = sum(v.numel() for v in base_state.values())
    n_train = trainable(model)
    name = args.method + ("-norouter" if args.method == "multihead" and args.no_router else "")
    name += f"-r{args.rank}" if args.rank != 8 and args.method not in ("none", "full") else ""
    log(f"method {name}: {n_train:,} trainable parameters "
        f"({n_train / n_base:.2%} of the base's {n_base:,})")
    run_dir = os.path.join(args.out, f"{args.suite}-{name}-seed{args.seed}")
    t1 = time.perf_counter()
    extra = regularizer(model, args, args.steps)
    speed, loss = train(model, args, tasks, args.steps, args.lr, args.method,
                  ckpt_path=os.path.join(run_dir, "ckpt.pt"), resume=args.resume, extra=extra)
    if hasattr(extra, "remove"):
        extra.remove()
    train_time = time.perf_counter() - t1
    acc = evaluate(model, args, tasks)
    text, learned = diagnostics(model, args, tasks)
    log(report(acc, tasks) + ("\n" + text if text else ""))
    metrics = dict(method=name, suite=args.suite, seed=args.seed, trainable=n_train,
                   base_params=n_base, accuracy=acc, learned=learned, loss=loss, steps_per_s=speed,
                   train_s=train_time, processes=WORLD,
                   total_s=time.perf_counter() - t0,
                   args={k: v for k, v in vars(args).items() if k not in ("resume",)})
    save_atomic(adapter_state(model, args.method), os.path.join(run_dir, "adapter.pt"))
    write_text(json.dumps(finite(metrics), indent=1), os.path.join(run_dir, "metrics.json"))
    ckpt = os.path.join(run_dir, "ckpt.pt")
    if RANK == 0 and os.path.exists(ckpt):
        os.remove(ckpt)
    log(f"wrote {run_dir}/metrics.json and adapter.pt; {train_time:.1f}s training, "
          f"{speed:.1f} steps/s, {metrics['total_s']:.1f}s in all")
    return metrics


def run_all(argv, args):
    """Every method on --seeds seeds, one table. On the interference suite each adapter method is
    also paired with a LoRA of about its trainable-parameter count (rank rounded)."""
    tasks, seeds = SUITES[args.suite], range(args.seed, args.seed + args.seeds)
    results, t0, total = {}, time.perf_counter(), len(ALL) * args.seeds

    def one(label, flags):
        for i in seeds:
            done = [r for rs in results.values() for r in rs]
            trained = [r["total_s"] for r in done if r["trainable"]]   # "none" runs take no time
            todo = total - len(done) - (args.seeds - len(results.get("none", [])))
            left = f", about {sum(trained) / len(trained) * todo:.0f}s left" if trained else ""
            log(f"\n=== [{len(done) + 1}/{total}] {label}, seed {i}; "
                f"{time.perf_counter() - t0:.0f}s so far{left}")
            results.setdefault(label, []).append(run(get_args(argv + flags + ["--seed", str(i)])))
    for label in ALL:
        one(label, ["--method"] + label.split())
    pairs = {}
    if args.suite == "interference":      # a LoRA of about the same size for every adapter method
        lora_r = results["lora"][0]["args"]["rank"]
        per_rank = results["lora"][0]["trainable"] / lora_r
        for label in ALL[3:]:
            r = max(1, round(results[label][0]["trainable"] / per_rank))
            pairs[label] = "lora" if r == lora_r else f"lora r{r}"
            if pairs[label] not in results:
                total += args.seeds
                one(pairs[label], ["--method", "lora", "--rank", str(r)])
    table = summary_table(results, tasks, pairs)
    path = os.path.join(args.out, f"{args.suite}-all")
    write_text(table + "\n", path + ".md")
    write_text(json.dumps(finite(dict(results=results, pairs=pairs)), indent=1), path + ".json")
    log(f"\n{table}\n\n{args.seeds} seed(s); {time.perf_counter() - t0:.0f}s in all; "
          f"wrote {path}.md and {path}.json")
    return results


def summary_table(results, tasks, pairs):
    """Markdown: trainable parameters, mean +- std over seeds of each task's in-distribution
    accuracy and their average, task B's shifted accuracy, time and speed."""
    def ms(xs):
        xs = torch.tensor(xs, dtype=torch.float64) * 100
        return f"{xs.mean():.1f} ± {xs.std():.1f}" if len(xs) > 1 else f"{xs.mean():.1f}"
    cols = ["method", "trainable", *tasks, "average"] + (["has7 shifted"] if "has7" in tasks else [])
    cols += ["paired LoRA: average"] if pairs else []
    cols += ["train s", "steps/s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for label, rs in results.items():
        ids = [r["accuracy"]["id"] for r in rs]
        row = [label, f"{rs[0]['trainable']:,} ({rs[0]['trainable'] / rs[0]['base_params']:.1%})"]
        row += [ms([a[t] for a in ids]) for t in tasks] + [ms([sum(a[t] for t in tasks) / len(tasks) for a in ids])]
        if "has7" in tasks:
            row.append(ms([r["accuracy"]["shift"]["has7"] for r in rs]))
        if pairs:
            p = pairs.get(label)
            row.append(f"{p}: " + ms([sum(r["accuracy"]["id"][t] for t in tasks) / len(tasks)
                                      for r in results[p]]) if p else "")
        row += [f"{sum(r['train_s'] for r in rs) / len(rs):.0f}",
                f"{sum(r['steps_per_s'] for r in rs) / len(rs):.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    args = get_args()
    if WORLD > 1:                                          # launched by torchrun
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        if args.device.startswith("cuda"):
            torch.cuda.set_device(args.device)
    try:
        run_all(sys.argv[1:], args) if args.method == "all" else run(args)
    finally:
        if WORLD > 1:
            dist.destroy_process_group()
