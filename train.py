"""Fine-tune a small pre-trained transformer on a tiny multi-task benchmark with one method.

    python train.py --method align               # pre-trains and caches the base the first time
    python train.py --method mtl --suite interference --rank 2
    python train.py --method lora --train-samples 256           # a finite training set per task
    python train.py --method lora --tasks inc                   # one task of the suite, alone
    torchrun --standalone --nproc_per_node=2 train.py --method lora       # data parallel

Top to bottom, the lesson: the data, the model, adapting the model for a method (one block per
method), the training loop, evaluation, then run() on one screen (checks, the base, adapt, train,
evaluate, save). Under one banner after run() the harness follows, which a first read can skip:
the command line, run()'s bookkeeping helpers (each says what it protects) and main(). A run
writes <out>/<suite>-<method>-seed<s>[-<flag><value>...]/ (every setting you changed is in the
name): metrics.json and adapter.pt.
"""
import argparse
import contextlib
import functools
import glob
import hashlib
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

try:
    import fcntl                                  # a run folder's lock (POSIX; none elsewhere)
except ImportError:
    fcntl = None

# ----------------------------------------------------------------------------- data
# A sample is [task] x1..xL [SEP] y1..ym: digit tokens 0-9, then SEP, PAD and one token per task.
# Sequence tasks answer L digits; classification tasks answer one digit (0/1), then PAD.
# The model reads seq[:-1] and predicts seq[1:]; the loss counts answer tokens only.
SEP, PAD = 10, 11
TASKS = ["copy", "reverse", "sort", "inc", "first_ge5", "has7", "sort_desc", "dec", "rotate"]
SUITES = {"pretrain": ["copy", "reverse"],
          "default": ["sort", "inc", "first_ge5", "has7"],                # A = first_ge5, B = has7
          "interference": ["sort", "sort_desc", "inc", "dec", "rotate"],  # opposite pulls
          "related": ["sort", "sort_low", "sort_high"]}                   # one skill, 3 inputs
# The related suite sorts digits 0-9, 0-4 or 5-9. Its new tasks borrow the task tokens of tasks
# outside it, so the base's vocabulary (one token per task of TASKS) and the cached base stay.
DIGITS = {"sort_low": (0, 5), "sort_high": (5, 10)}
TOKEN_OF = {"sort_low": "dec", "sort_high": "rotate"}
ANSWER = {   # x (n, L) digits -> answer (n, L) or label (n,)
    "copy": lambda x: x, "reverse": lambda x: x.flip(1),
    "sort": lambda x: x.sort(1).values, "sort_desc": lambda x: x.sort(1, descending=True).values,
    "inc": lambda x: (x + 1) % 10, "dec": lambda x: (x + 9) % 10, "rotate": lambda x: x.roll(-1, 1),
    "first_ge5": lambda x: (x[:, 0] >= 5).long(), "has7": lambda x: (x == 7).any(1).long(),
    "sort_low": lambda x: x.sort(1).values, "sort_high": lambda x: x.sort(1).values,
}
SPLIT_SEED = {"train": 1, "val": 2, "test": 3, "train-set": 4}
L = 8                                   # digits per input
RHO_SHIFT, NOISE = 0.1, 0.25            # has7's agreement on the shifted split, its label noise


def data_seed(split, seed, step=0):
    return (SPLIT_SEED[split] * 1_000_003 + seed) * 1_000_003 + step


def make_batch(tasks, n, seed, L=L, rho=(0.8, 0.95), rho_shift=RHO_SHIFT, noise=NOISE,
               shifted=False, device="cpu", env_tasks="has7", env_source="annotated"):
    """n samples, task i % len(tasks), from one seed: idx (n, 2L+1) inputs, targets (n, 2L+1)
    (-100: no answer token), clean (targets with has7's clean label), task (n,), env (n,).
    has7 is built like Colored MNIST: y = "contains a 7", flipped with prob. `noise`; the first
    digit then agrees with the noisy label (first_ge5's feature, a shortcut) with prob. rho[env]
    (env 0 / 1; the shifted split: rho_shift, env 2). Other tasks' env: -1 (none), or with
    env_tasks="all" a random 0 / 1. env_source="derived": has7's env is its first_ge5 label."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    rand = lambda *shape: torch.rand(shape, generator=g, device=device)
    digit = lambda lo, hi, *shape: torch.randint(lo, hi, shape, generator=g, device=device)
    task = torch.arange(n, device=device) % len(tasks)                # (n,) an even mix
    env = digit(0, 2, n) if not shifted else torch.full((n,), 2, device=device)
    x = digit(0, 10, n, L)                                            # (n, L)
    for i, t in enumerate(tasks):                                     # the related suite's inputs
        if t in DIGITS:
            x = torch.where((task == i)[:, None], digit(*DIGITS[t], n, L), x)
    is_b = torch.zeros(n, dtype=torch.bool, device=device)
    if "has7" in tasks:
        y = rand(n) < 0.5                                             # clean label
        xb = digit(0, 9, n, L)
        xb = xb + (xb >= 7).long()                                    # digits without a 7
        pos = digit(1, L, n)                                          # (n,) where the 7 goes
        rows = torch.arange(n, device=device)
        xb[rows, pos] = torch.where(y, 7, xb[rows, pos])              # one 7 when y
        y_noisy = y ^ (rand(n) < noise)
        rho_e = torch.where(env == 0, rho[0], torch.where(env == 1, rho[1], rho_shift))   # (n,)
        a = y_noisy ^ (rand(n) >= rho_e)                              # A's feature agrees w.p. rho
        high = digit(0, 4, n)
        high = high + 5 + (high >= 2).long()                          # 5, 6, 8 or 9 (no 7)
        xb[:, 0] = torch.where(a, high, digit(0, 5, n))
        is_b = task == tasks.index("has7")
        x = torch.where(is_b[:, None], xb, x)
        if env_source == "derived":                                   # needs no annotation
            env = torch.where(is_b, (x[:, 0] >= 5).long(), env)
    if env_tasks == "has7":
        env = torch.where(is_b, env, -1)
    ans = torch.full((n, L), PAD, device=device)                      # (n, L) answer tokens
    task_tok = torch.zeros_like(task)
    for i, t in enumerate(tasks):                                     # a few tasks, vectorized
        out = ANSWER[t](x)
        if out.dim() == 1:                                            # a label, then padding
            out = torch.cat([out[:, None], ans[:, 1:]], 1)
        ans = torch.where((task == i)[:, None], out, ans)
        task_tok = torch.where(task == i, 12 + TASKS.index(TOKEN_OF.get(t, t)), task_tok)
    seq = torch.cat([task_tok[:, None], x, torch.full((n, 1), SEP, device=device), ans], 1)
    clean = seq[:, 1:].clone()                                        # (n, 2L+1)
    clean[:, :L + 1] = -100
    clean[clean == PAD] = -100
    targets = clean.clone()
    if "has7" in tasks:
        targets[:, L + 1] = torch.where(is_b, y_noisy.long(), clean[:, L + 1])
    return dict(idx=seq[:, :-1], targets=targets, clean=clean, task=task, env=env)


def draw(data_set, sizes, n, seed):
    """n samples (task i % T) drawn with replacement from a finite set made by make_batch with
    max(sizes) * T samples, of which task t uses its first sizes[t] (sample j * T + t)."""
    g = torch.Generator(device=data_set["idx"].device)
    g.manual_seed(seed)
    t = torch.arange(n, device=g.device) % len(sizes)                # (n,) each sample's task
    j = (torch.rand(n, generator=g, device=g.device) * sizes.to(g.device)[t]).long()
    return {k: v[j * len(sizes) + t] for k, v in data_set.items()}

# ----------------------------------------------------------------------------- model


@dataclass
class GPTConfig:
    vocab: int = 12 + len(TASKS)
    block: int = 2 * L + 1
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
        q, k, v = (m(h).view(B, T, self.heads, -1).transpose(1, 2) for m in (self.q, self.k,
                                                                             self.v))
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

# ----------------------------------------------------------------------------- adapting a model


class TaskModel(nn.Module):
    """The GPT with a method's adapters and what the method wires around it: MTL-LoRA's layers
    read each sample's task id (shared_id: id 0 for all); MT-CRL's graph gates the final hidden
    state before the head."""

    def __init__(self, gpt, crl=None, task_aware=False, shared_id=False):
        super().__init__()
        self.gpt, self.crl = gpt, crl
        self.task_aware, self.shared_id = task_aware, shared_id

    def forward(self, idx, task):                                     # -> logits, final state h
        if self.task_aware:
            with mtl_lora.task_ids(self.gpt, torch.zeros_like(task) if self.shared_id else task):
                h = self.gpt.features(idx)                            # (B, T, d)
        else:
            h = self.gpt.features(idx)
        return self.gpt.head(h if self.crl is None else self.crl(h, task)), h


@dataclass
class Method:                          # what a method adds to the GPT, for training and the report
    model: TaskModel                   # the GPT with its adapters; forward(idx, task)
    state: object                      # () -> the tensors to save (adapter.pt)
    extra_loss: object = None          # (step, batch, logits, h) -> a term added to the loss
    learned: object = None             # (batch) -> {name: what it learned, per task or layer}
    hint: tuple = ()                   # its flags to lower if the loss blows up


def adapt(gpt, args, n_tasks):
    """Put args.method's adapters on the (pre-trained) GPT, in place: one block per method."""
    m = args.method
    hp = dict(r=args.rank, alpha=args.alpha, dropout=args.dropout)
    if m == "none":                                                   # the base as it is
        gpt.requires_grad_(False)
        return Method(TaskModel(gpt), state=dict)
    if m == "full":                                                   # every weight trains
        return Method(TaskModel(gpt), state=gpt.state_dict)
    if m == "lora":
        lora.add_lora(gpt, args.targets, **hp)
        return Method(TaskModel(gpt), functools.partial(lora.lora_state_dict, gpt))
    if m == "multihead":                                              # HydraLoRA, or M-LoRA
        multihead_lora.add_multihead_lora(gpt, args.targets, n_heads=args.lora_heads,
                                          router=not args.no_router, init=args.init, **hp)

        def learned(b):
            sims = multihead_lora.head_similarity(gpt).items()                # per layer
            out = {"head_similarity": {k: None if math.isnan(v) else v for k, v in sims}}
            if not args.no_router:
                with multihead_lora.record_routing(gpt) as w:
                    gpt.features(b["idx"])
                out["routing"] = multihead_lora.routing_table(w, b["task"], n_tasks,
                                                              b["idx"] != PAD)   # task x head
            return out
        return Method(TaskModel(gpt), functools.partial(multihead_lora.multihead_state_dict, gpt),
                      learned=learned)
    if m == "mtl":                                                    # reads the task ids
        mtl_lora.add_mtl_lora(gpt, 1 if args.shared_id else n_tasks, args.targets, n_up=args.n_up,
                              tau=args.temperature, diagonal=args.diagonal, **hp)
        for layer in mtl_lora.mtl_layers(gpt):                        # ablations (the controls):
            if args.task_transform != "learned":                      # Lam_t frozen, or split
                freeze_lambda(layer, args.task_transform)
            if args.n_up == 1:                # p_t = softmax of one logit = 1: w_t cannot learn
                layer.lora_w.requires_grad_(False)

        def mixing(b):                                                # p_t, task x B_i
            p = mtl_lora.mixing_weights(gpt).values()                 # per layer
            return {"mixing_weights": torch.stack(list(p)).mean(0)}
        return Method(TaskModel(gpt, task_aware=True, shared_id=args.shared_id),
                      functools.partial(mtl_lora.mtl_state_dict, gpt), learned=mixing,
                      hint=("--temperature",))
    if m == "align":                                                  # L_task + lambda L_align
        lora.add_lora(gpt, args.targets, **hp)
        align = align_lora.AlignmentLoss(gpt, n_tasks, kind=args.align_loss)   # hooks lora_A

        def extra(step, b, logits, h):
            return args.align_weight * align(b["task"], b["idx"] != PAD)

        def final_align(b):                           # L_align after training, any weight (0 too)
            gpt.features(b["idx"])
            return {"alignment_loss": align(b["task"], b["idx"] != PAD)}
        return Method(TaskModel(gpt), functools.partial(lora.lora_state_dict, gpt), extra,
                      final_align, hint=("--align-weight",))
    if m == "spurious":                                               # MT-CRL on the final state
        lora.add_lora(gpt, args.targets, **hp)
        crl = spurious_reg.MTCRL(args.width, n_tasks, args.modules)

        def extra(step, b, logits, h):
            answer = b["targets"] != -100                             # (B, T) answer tokens
            tok = F.cross_entropy(logits.float().transpose(1, 2), b["targets"], reduction="none")
            risk = tok.sum(1) / answer.sum(1)                         # (B,) per-sample risk
            loss = args.decorr_weight * crl.decorrelation(h, answer)
            loss = loss + args.sparsity_weight * crl.sparsity()
            w = spurious_reg.warmup_weight(step, args.steps, args.invariance_weight,
                                           args.invariance_warmup)
            return loss + w * crl.invariance(risk, b["task"], b["env"]) if w > 0 else loss

        def state():
            return lora.lora_state_dict(gpt) | {"crl.G": crl.G.detach()}

        def graph(b):                                                 # task x module gates
            return {"graph": crl.gates()}
        return Method(TaskModel(gpt, crl), state, extra, graph,
                      ("--invariance-weight", "--decorr-weight"))
    raise ValueError(f"unknown method {m!r}")


def freeze_lambda(layer, kind):
    """MTL-LoRA's Lam_t frozen: at the identity, or split: a 0/1 diagonal that keeps task t's
    r/T rows of A (with one up-projection: T separate LoRAs of rank r/T, HydraLoRA's LoRA-Split)."""
    T, r = layer.lora_lambda.shape[:2]
    keep = torch.ones(T, r)                                           # (T, r) the diagonals
    if kind == "split":
        keep = (torch.arange(r) // (r // T) == torch.arange(T)[:, None]).float()
    with torch.no_grad():
        layer.lora_lambda.copy_(keep if layer.diagonal else torch.diag_embed(keep))
    layer.lora_lambda.requires_grad_(False)

# ----------------------------------------------------------------------------- training
# Under torchrun (WORLD > 1) each process trains on its share of every global batch, drawn with
# its own seed; DDP averages the gradients; process 0 alone prints and writes files.
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def lr_at(step, steps, warmup, peak):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)                      # 0 -> 1 after the warm-up
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))    # cosine decay to 10%


def train(model, batches, steps, lr, warmup, extra=None, bf16=False, start=None,
          checkpoint=None, every=0):
    """AdamW on the trainable parameters, warm-up then cosine decay, gradient clipping; the loss
    is cross-entropy + extra(step, batch, logits, h); batches(step) gives the step's batch.
    checkpoint(state) is called every `every` steps; start: such a state to continue from.
    Returns the loss every 25 steps and at the end, and steps per second."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:                                                    # --method none
        return [], 0.0
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    device = params[0].device.type
    step0, losses = 0, []
    if start is not None:                   # the trainable weights, the optimizer, the RNG
        model.load_state_dict(start["trainable"], strict=False)
        opt.load_state_dict(start["opt"])
        torch.set_rng_state(start["rng"])
        if device == "cuda":
            torch.cuda.set_rng_state(start["cuda_rng"])
        step0, losses = start["step"], start["losses"]
    fwd = nn.parallel.DistributedDataParallel(model) if WORLD > 1 else model
    model.train()
    t0 = time.perf_counter()
    for step in tqdm(range(step0, steps), "train", steps, initial=step0, disable=RANK != 0):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, warmup, lr)
        b = batches(step)
        with torch.autocast(device, torch.bfloat16, enabled=bf16):
            logits, h = fwd(b["idx"], b["task"])
        loss = F.cross_entropy(logits.float().flatten(0, 1), b["targets"].flatten())
        if extra is not None:
            loss = loss + extra(step, b, logits, h)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 25 == 0 or step + 1 == steps:                # a host read: not every step
            value = loss.detach()
            if WORLD > 1:
                torch.distributed.all_reduce(value)                   # the global batch's loss
            losses.append([step + 1, value.item() / WORLD])
            if not math.isfinite(losses[-1][1]):
                raise FloatingPointError(f"the loss became {losses[-1][1]} by step {step + 1}")
        if checkpoint and every and (step + 1) % every == 0 and step + 1 < steps:
            trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
            cuda_rng = torch.cuda.get_rng_state() if device == "cuda" else None
            checkpoint(dict(step=step + 1, trainable=trained, opt=opt.state_dict(), losses=losses,
                            rng=torch.get_rng_state(), cuda_rng=cuda_rng))
    model.eval()
    return losses, (steps - step0) / max(time.perf_counter() - t0, 1e-9)

# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, splits, tasks):
    """Exact-match accuracy per task (every answer token the arg-max under teacher forcing)
    against clean labels; on has7 also what its shortcut, the first digit alone, scores."""
    out = {}
    for split, b in splits.items():
        right = []
        for i in range(0, len(b["idx"]), 2048):                       # in chunks: bounded memory
            pred = model(b["idx"][i:i + 2048], b["task"][i:i + 2048])[0].argmax(-1)
            c = b["clean"][i:i + 2048]
            right.append(((pred == c) | (c == -100)).all(1))
        right = torch.cat(right).float()                              # (n,) 1: all answer right
        n = torch.bincount(b["task"], minlength=len(tasks))
        acc = torch.zeros(len(tasks), device=right.device).index_add_(0, b["task"], right) / n
        out[split] = {t: a for t, a, k in zip(tasks, acc.tolist(), n.tolist()) if k}  # --tasks
        if "has7" in out[split]:
            is_b = b["task"] == tasks.index("has7")
            guess = (b["idx"][is_b, 1] >= 5).long()
            out[split]["shortcut"] = (guess == b["clean"][is_b, L + 1]).float().mean().item()
    return out


def report(acc, tasks):
    lines = [f"{'task':<12}" + "".join(f"{s:>8}" for s in acc)]
    for t in tasks + (["shortcut"] if "has7" in tasks else []):
        lines.append(f"{t:<12}" + "".join(f"{a[t]:>8.1%}" if t in a else f"{'-':>8}"
                                          for a in acc.values()))
    if "has7" in tasks:
        lines.append("(against clean labels; shortcut: has7 read off the first digit)")
    return "\n".join(lines)


def examples(model, b, tasks):
    """Test samples: input, expected answer, the model's (every answer token its arg-max)."""
    pred = model(b["idx"], b["task"])[0].argmax(-1)
    lines = ["examples (input -> answer, model):"]
    for i in b["task"].argsort(stable=True).tolist():
        keep = b["clean"][i] != -100                                  # the answer tokens
        want, got = b["clean"][i][keep].tolist(), pred[i][keep].tolist()
        x = " ".join(map(str, b["idx"][i, 1:L + 1].tolist()))
        lines.append(f"  {tasks[b['task'][i]]:<10} {x}  ->  {' '.join(map(str, want))}   model: "
                     f"{' '.join(map(str, got))}" + ("" if got == want else "   (wrong)"))
    return "\n".join(lines)

# ----------------------------------------------------------------------------- run: the lesson


def run(args):
    """One run, as a learner reads it: checks, the base, adapt, train, evaluate, save. A finished
    run is reported, never retrained; the bookkeeping is in the harness, below the banner."""
    t0 = time.time()
    tasks = SUITES[args.suite]
    folder = os.path.join(args.out, args.name)
    with claim(folder):                               # one process per run folder; tidy on exit
        done = finished(folder, args)                 # its metrics, reported; or None
        if done is not None:
            return done
        start = resume_point(folder, args)            # an interrupted run's checkpoint, or None
        base = cached_base(args)                      # pre-trained and cached the first time

        torch.manual_seed(args.seed)                                  # the adapters' init
        gpt = GPT(model_config(args))
        gpt.load_state_dict(base["state_dict"])
        method = adapt(gpt, args, len(tasks))                         # one block per method
        model = method.model.to(args.device)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_base = sum(v.numel() for v in base["state_dict"].values())
        log(f"{args.name}: {n_train:,} trainable parameters ({n_train / n_base:.2%} of {n_base:,})")

        data_set = finite_set(args, tasks)            # --train-samples; None: fresh every step
        losses, speed = fit(model, method, args, data_set, start, folder)

        acc = evaluate(model, eval_splits(args, tasks, data_set), tasks)
        shown = args.tasks or tasks
        log(report(acc, shown), examples(model, test_sample(args, tasks, 2), tasks), sep="\n")
        learned = what_it_learned(method, test_sample(args, tasks, 200), tasks)

        metrics = dict(name=args.name, method=args.method, suite=args.suite, seed=args.seed,
                       trainable=n_train, base_params=n_base, accuracy=acc, learned=learned,
                       epochs=epochs(args, tasks), losses=losses,
                       loss=losses[-1][1] if losses else None, steps_per_s=speed,
                       total_s=time.time() - t0, settings=run_settings(args))
        write_results(folder, method.state(), metrics)
        log(f"wrote {folder}/: metrics.json, adapter.pt; {speed:.1f} steps/s, "
            f"{time.time() - t0:.0f} s")
        return metrics

# ============ the harness: the command line, run()'s bookkeeping, main(). A first read stops here.

# ----------------------------------------------------------------------------- command line
METHODS = ["none", "full", "lora", "multihead", "mtl", "align", "spurious"]
TARGETS = ["q", "k", "v", "o", "up", "down"]
BASE = dict(lr=3e-3, batch=256, warmup=50)                          # the base's pre-training


def between(lo, hi, kind=float):                  # an argparse type: a number in [lo, hi]
    def number(text):
        value = kind(text) + 0                    # + 0: -0 is 0 (one folder for both)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo:g}, {hi:g}], got {text}")
        return value
    number.__name__ = kind.__name__
    return number


def whole(lo, hi):                                # an argparse type: an integer in [lo, hi]
    return between(lo, hi, int)


GROUPS = {"": None, "adapters": "adapters (every method but none and full)",
          "multihead": "multihead: HydraLoRA, or M-LoRA with --no-router",
          "mtl": "mtl: MTL-LoRA", "align": "align: Align-LoRA",
          "spurious": "spurious: MT-CRL (suite default, where has7 has environments)",
          "model": "model, base and data", "running": "running"}
FLAGS = [   # (group, flag, default, a type or the choices, help); a method's group is its own
    ("", "--method", "lora", METHODS, "none: the base as is; full: all weights"),
    ("", "--suite", "default", ["default", "interference", "related"], "the tasks"),
    ("", "--tasks", None, str, "train some tasks of the suite alone, e.g. inc: each step keeps "
     "their samples of the suite's batch (the same samples as in the multi-task run)"),
    ("", "--steps", 1000, whole(1, 1e7), "adaptation steps"),
    ("", "--batch", 256, whole(1, 1e6), "samples per step (all processes together)"),
    ("", "--lr", None, between(1e-7, 1), "peak learning rate (default 3e-3; full: 1e-3)"),
    ("", "--warmup", None, whole(0, 1e7), "linear warm-up steps, then cosine decay to 10%% "
     "(default min(50, steps / 10))"),
    ("", "--train-samples", None, str, "a finite training set: N samples per task, or per "
     "task, e.g. 2000,inc=64 (inc 64, the others 2000); default: a fresh batch every step"),
    ("adapters", "--rank", 8, whole(1, 4096), "adapter rank r (multihead: of each head)"),
    ("adapters", "--alpha", None, between(1e-6, 1e6), "scaling s = alpha / r (default 2r); "
     "as called alone, lora.py takes r=8, alpha=16, multihead_lora.py the authors' r=4, alpha=32"),
    ("adapters", "--dropout", None, between(0, 0.99), "adapter dropout (default 0; M-LoRA 0.05)"),
    ("adapters", "--targets", "q,k,v,o,up,down", str, "layers: q k v o (attention) up down (MLP)"),
    ("multihead", "--lora-heads", 3, whole(1, 64), "adapter heads B_i (N)"),
    ("multihead", "--no-router", False, bool, "M-LoRA: the mean of the heads, no router"),
    ("multihead", "--init", "zero", ["zero", "offset"], "M-LoRA's heads: zero, or random with "
     "the start subtracted (the Align-LoRA authors')"),
    ("mtl", "--n-up", 3, whole(1, 64), "shared up-projections B_i (n)"),
    ("mtl", "--temperature", 0.1, between(1e-3, 1e3), "tau of p_t = softmax(w_t / tau)"),
    ("mtl", "--diagonal", False, bool, "diagonal task transforms Lam_t"),
    ("mtl", "--shared-id", False, bool, "every sample gets task id 0 (the control for ids)"),
    ("mtl", "--task-transform", "learned", ["learned", "identity", "split"], "Lam_t learned, "
     "or frozen: at I, or split: task t keeps its r/T rows of A (needs --n-up 1: T LoRAs of "
     "rank r/T, HydraLoRA's LoRA-Split)"),
    ("align", "--align-loss", "kl", ["kl", "mmd"], "the alignment loss"),
    ("align", "--align-weight", 0.2, between(0, 1e4), "lambda of L_task + lambda L_align"),
    ("spurious", "--modules", 4, whole(1, 4096), "modules K: chunks of the final state"),
    ("spurious", "--decorr-weight", 0.01, between(0, 1e4), "weight of the decorrelation loss"),
    ("spurious", "--sparsity-weight", 0.01, between(0, 1e4), "weight of the graph's L1"),
    ("spurious", "--invariance-weight", 10.0, between(0, 1e4), "weight of the IRMv1 penalty"),
    ("spurious", "--invariance-warmup", 0.3, between(0, 1), "share of the steps before it"),
    ("spurious", "--env-tasks", "has7", ["has7", "all"], "the samples in environments: has7's, "
     "or every task's (random ids for the others)"),
    ("spurious", "--env-source", "annotated", ["annotated", "derived"], "has7's environment: "
     "the data's (rho), or derived: first_ge5's label of the same input"),
    ("model", "--width", 64, whole(1, 4096), "model width"),
    ("model", "--layers", 3, whole(1, 64), "transformer blocks"),
    ("model", "--attn-heads", 4, whole(1, 64), "attention heads"),
    ("model", "--base-steps", 1500, whole(1, 1e7), "pre-training steps of the base"),
    ("model", "--rho", "0.8,0.95", str, "has7's two training environments: how often the first "
     "digit's feature agrees with its label (0.1 on the shifted test split)"),
    ("running", "--seed", 0, whole(0, 2**31 - 1), "seed of the adapter init and the data"),
    ("running", "--eval-samples", 1000, whole(1, 1e5), "evaluation samples per task, split"),
    ("running", "--out", "out", str, "folder of the run folders"),
    ("running", "--base", None, str, "the cached base model (default: <out>/base.pt)"),
    ("running", "--device", "auto", ["auto", "cpu", "cuda"], "auto: cuda when present"),
    ("running", "--autocast", "auto", ["auto", "bf16", "off"], "auto: bf16 on CUDA"),
    ("running", "--compile", False, bool, "torch.compile the model's body"),
    ("running", "--resume", False, bool, "continue this run, interrupted, from its ckpt.pt"),
    ("running", "--ckpt-every", 250, whole(0, 1e7), "checkpoint every N steps (0: never)")]
OWN = {g: [f[2:].replace("-", "_") for h, f, *_ in FLAGS if h == g] for g in METHODS + ["adapters"]}


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    groups = {g: p.add_argument_group(title) if title else p for g, title in GROUPS.items()}
    for group, flag, default, kind, text in FLAGS:
        add = groups[group].add_argument
        if kind is bool:
            add(flag, action="store_true", help=text)
        elif isinstance(kind, list):
            add(flag, default=default, choices=kind, help=text)
        else:
            add(flag, default=default, type=kind, help=text)
    return p


class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):           # every default shown; None ones in the help
        return action.help if action.default is None else super()._get_help_string(action)


def get_args(argv=None):
    """The command line, checked, with canonical values; args.name names the run folder."""
    p = parser()
    args = p.parse_args(argv)
    tasks = SUITES[args.suite]
    given = {k for k, v in vars(args).items() if v != p.get_default(k)}
    own = OWN.get(args.method, []) + ([] if args.method in ("none", "full") else OWN["adapters"])
    alien = ["--" + k.replace("_", "-") for k in sum(OWN.values(), []) if k in given - set(own)]
    args.tasks = listed(args.tasks, tasks, "--tasks", p.error)        # None or suite order
    args.tasks = None if args.tasks == tasks else args.tasks          # every task: the suite's run
    args.targets = listed(args.targets, TARGETS, "--targets", p.error)    # q,q,v is q,v
    for wrong, message in [
            (alien, f"{' '.join(alien)}: not a setting of --method {args.method}; drop it"),
            ((args.warmup or 0) > args.steps, "--warmup must be at most --steps"),
            (args.width % args.attn_heads, "--width must divide by --attn-heads"),
            (args.method == "spurious" and args.width % args.modules, "--modules must divide "
             "--width"),
            (args.method == "spurious" and "has7" not in (args.tasks or tasks), "--method "
             "spurious needs has7's environments (--suite default): without them its invariance "
             f"penalty is 0; got --suite {args.suite}" + (" --tasks" if args.tasks else "")),
            (args.method == "align" and len(args.tasks or tasks) < 2, "--method align pulls "
             "tasks' codes together: it needs two tasks or more (one task alone: --method lora)"),
            (args.init == "offset" and not args.no_router, "--init offset needs --no-router"),
            ("temperature" in given and args.n_up == 1, "--temperature does nothing with --n-up "
             "1 (p_t = softmax of one logit = 1): drop it"),
            (args.diagonal and args.task_transform != "learned", "--diagonal does nothing with "
             f"--task-transform {args.task_transform} (Lam_t is frozen at a diagonal): drop it"),
            (args.shared_id and args.task_transform == "split", "--task-transform split with "
             "--shared-id keeps every row of A for the one id: that is --task-transform identity"),
            (args.task_transform == "split" and (args.n_up != 1 or args.rank % len(tasks)),
             f"--task-transform split needs --n-up 1 and a --rank that divides by the "
             f"{len(tasks)} tasks"),
            (args.batch % WORLD or args.batch // WORLD < len(tasks), f"--batch is global: it must "
             f"divide by the {WORLD} processes, each with a sample of each task at least"),
            (args.device == "cuda" and not torch.cuda.is_available(), "--device cuda: no CUDA"),
            (args.base is not None and (args.base.endswith(os.sep) or os.path.isdir(args.base)
                                        or not args.base), "--base takes a file's path")]:
        if wrong:
            p.error(message)
    try:
        rho = [float(r) + 0 for r in args.rho.split(",")]
        assert len(rho) == 2 and all(0 <= r <= 1 for r in rho)
    except (ValueError, AssertionError):
        p.error(f"--rho takes two numbers in [0, 1], e.g. 0.8,0.95; got {args.rho}")
    args.rho = rho
    args.train_samples = parse_sizes(args.train_samples, tasks, p.error)
    auto = dict(lr=1e-3 if args.method == "full" else 3e-3, alpha=2.0 * args.rank,
                warmup=min(50, args.steps // 10),
                dropout=0.05 if args.method == "multihead" and args.no_router else 0.0,
                device="cuda" if torch.cuda.is_available() else "cpu")   # defaults that follow
    for k in auto:
        if getattr(args, k) in (None, "auto"):
            setattr(args, k, auto[k])
    auto["autocast"] = "bf16" if args.device == "cuda" else "off"
    if args.autocast == "auto":
        args.autocast = auto["autocast"]
    default = vars(p.parse_args([])) | auto | dict(targets=TARGETS, rho=[0.8, 0.95])
    name = [args.suite, args.method + ("-norouter" if args.no_router else ""), f"seed{args.seed}"]
    name += [flag_text(k, v) for k, v in run_settings(args).items()
             if k not in ("method", "suite", "seed", "no_router", "processes") and v != default[k]]
    args.name = "-".join(name + ([f"procs{WORLD}"] if WORLD > 1 else []))
    args.base = args.base or os.path.join(args.out, "base.pt")
    return args


def listed(text, choices, flag, error):               # some of `choices`, in their order
    if text is None:
        return None
    chosen = [t.strip() for t in text.split(",")]
    if set(chosen) - set(choices):
        error(f"{flag} takes some of {','.join(choices)}, comma-separated: got {text}")
    return [t for t in choices if t in chosen]


def parse_sizes(text, tasks, error):
    """--train-samples: None, N for every task, or a size per task and a bare N for the others;
    canonical: None, N, or a list in the suite's order."""
    if text is None:
        return None
    per = {}
    for part in text.split(","):
        t, _, n = part.strip().rpartition("=")
        if not (n.isascii() and n.isdigit() and 1 <= int(n) <= 10**6 and t in tasks + [""]
                and t not in per):
            error(f"--train-samples takes N or task=N, comma-separated (N in [1, 1e6]; tasks "
                  f"{', '.join(tasks)}), e.g. 2000,inc=64; got {text}")
        per[t] = int(n)
    out = [per.get(t, per.get("")) for t in tasks]
    if None in out:
        error(f"--train-samples: no size for {[t for t, n in zip(tasks, out) if n is None]}")
    return out[0] if len(set(out)) == 1 else out


def run_settings(args):
    """Every setting that changes what a run computes; the folder's name has the changed ones."""
    skip = ("out", "base", "resume", "ckpt_every", "name")
    return {k: v for k, v in vars(args).items() if k not in skip} | {"processes": WORLD}


def flag_text(k, v):                                  # e.g. rank2, targetsq+v, diagonal
    if isinstance(v, list):
        v = "+".join(map(str, v))
    elif isinstance(v, float):
        v = f"{v:g}"
    return k.replace("_", "-") + ("" if v is True else str(v))

# ----------------------------------------------------------------------------- run's helpers


def log(*a, **kw):
    if RANK == 0:
        print(*a, **kw, flush=True)


def model_config(args):
    return GPTConfig(width=args.width, layers=args.layers, heads=args.attn_heads)


@contextlib.contextmanager
def claim(folder):
    """The run folder, made if new, checked writable and locked while this process works in it
    (a finished run's is only read). Protects a run from a second process, which would redo it
    and write its files too, and leaves no folder that a refused or failed run made."""
    new, d, lock = [], os.path.abspath(folder), None
    while RANK == 0 and not os.path.exists(d):        # the folders process 0 makes, deepest first
        new.append(d)
        d = os.path.dirname(d)
    try:
        if RANK == 0 and not os.path.exists(os.path.join(folder, "metrics.json")):
            writable(folder)
            if fcntl is not None:                     # flock: gone when the process ends
                lock = os.open(folder, os.O_RDONLY)
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    new = []                          # they are the running process's now
                    raise SystemExit(f"error: another process is running {folder} now: let it "
                                     "finish (its lock goes when it stops, even if killed)")
            remove_stale(*(os.path.join(folder, f) for f in ("ckpt.pt", "adapter.pt",
                                                             "metrics.json")))
        yield
    finally:
        if lock is not None:
            os.close(lock)
        for d in new:
            with contextlib.suppress(OSError):        # rmdir removes an empty folder only
                os.rmdir(d)


def finished(folder, args):
    """A finished run's metrics, after its report; None if the run has not finished. Protects a
    result from being retrained or overwritten."""
    path = os.path.join(folder, "metrics.json")
    if os.path.exists(path):
        saved = load(path, "metrics", run_settings(args), "pass another --out")
        log(f"{folder} holds this run, finished:\n" + report(saved["accuracy"],
                                                             args.tasks or SUITES[args.suite]))
        return saved


def resume_point(folder, args):
    """--resume: the run's own checkpoint, checked; None for a new run. Protects the result: an
    unfinished run is never restarted silently, nor continued from another schedule's checkpoint
    or a damaged one."""
    ckpt = os.path.join(folder, "ckpt.pt")
    if os.path.exists(ckpt) and not args.resume:
        raise SystemExit(f"error: {folder} holds an unfinished run: --resume continues it")
    if args.resume and not os.path.exists(ckpt):
        raise SystemExit(f"error: nothing to resume: {ckpt} does not exist; drop --resume")
    if args.resume:
        return load(ckpt, "checkpoint", run_settings(args), "delete it to start the run over")


def cached_base(args):
    """The base, read from train.py's cache (its settings and digest checked), or pre-trained on
    copy and reverse (every weight trains) and cached for every run of these model settings.
    Protects the pre-training's minutes, and a run from another model's base or a damaged one."""
    pretraining = dict(model=asdict(model_config(args)), tasks=SUITES["pretrain"],
                       steps=args.base_steps) | BASE
    if os.path.exists(args.base):                     # a cache of train.py's: may be deleted
        return load(args.base, "base", pretraining, "pass another --base, or delete it to "
                    "pre-train anew")
    writable(os.path.dirname(args.base) or ".")       # before pre-training, not after
    remove_stale(args.base)                           # what a killed pre-training left
    log(f"pre-training the base on {pretraining['tasks']}; it is cached in {args.base}")
    torch.manual_seed(0)
    model = TaskModel(GPT(model_config(args))).to(args.device)
    if WORLD > 1:
        torch.manual_seed(1_000_003 * RANK)                           # each process its dropout
    train(model, stream(args, SUITES["pretrain"], 0, BASE["batch"]), args.base_steps,
          BASE["lr"], BASE["warmup"], bf16=args.autocast == "bf16")
    base = dict(settings=pretraining, state_dict={k: v.cpu() for k, v in
                                                  model.gpt.state_dict().items()})
    save(args.base, base | dict(digest=digest(base)))
    return base


def finite_set(args, tasks):
    """--train-samples: the training set, drawn once per seed, max(sizes) x T samples of which
    task t uses its first sizes[t]; None: a fresh batch every step."""
    if args.train_samples is None:
        return None
    if args.method != "none":
        log("a finite training set; epochs: " + ", ".join(f"{t} {e:.1f}" for t, e in
                                                         epochs(args, tasks).items()))
    return make_batch(tasks, max(set_sizes(args, tasks).tolist()) * len(tasks), data_seed(
        "train-set", args.seed), L, args.rho, device=args.device, env_tasks=args.env_tasks,
        env_source=args.env_source)


def set_sizes(args, tasks):                            # (T,) training samples per task
    return torch.tensor(args.train_samples).expand(len(tasks))


def epochs(args, tasks):                              # samples of each task seen / its set's size
    if args.train_samples is not None and args.method != "none":
        seen = (args.steps * args.batch / len(tasks) / set_sizes(args, tasks)).tolist()
        return {t: e for t, e in zip(tasks, seen) if t in (args.tasks or tasks)}


def stream(args, tasks, seed, batch, data_set=None, chosen=None):
    """step -> that step's batch (each process its own): fresh, or from the finite data_set;
    with `chosen` (--tasks), their samples only (sample i is task i % T: found once)."""
    n = batch // WORLD
    keep = None if chosen is None else torch.tensor(
        [i for i in range(n) if tasks[i % len(tasks)] in chosen], device=args.device)
    sizes = None if data_set is None else set_sizes(args, tasks).to(args.device)   # once

    def batch_at(step):
        s = data_seed("train", seed, step) + (RANK << 50)
        if data_set is not None:
            b = draw(data_set, sizes, n, s)
        else:
            b = make_batch(tasks, n, s, L, args.rho, RHO_SHIFT, NOISE, False, args.device,
                           args.env_tasks, args.env_source)
        return b if keep is None else {k: v[keep] for k, v in b.items()}
    return batch_at


def fit(model, method, args, data_set, start, folder):
    """train() with the run's batches, schedule and checkpoints. A loss that blows up stops the
    run naming the flags to lower, its checkpoint removed (resuming it would blow up again)."""
    ckpt = os.path.join(folder, "ckpt.pt")
    if WORLD > 1:
        torch.manual_seed(args.seed + 1_000_003 * RANK)               # each process its dropout
    if args.compile:               # the body only: MT-CRL's penalty differentiates head and graph
        torch._dynamo.reset()      # twice; a fresh cache: dynamo's guards can miss align's hooks
        model.gpt.features = torch.compile(model.gpt.features)

    def checkpoint(state):
        state = state | dict(settings=run_settings(args))
        save(ckpt, state | dict(digest=digest(state)))
    try:
        return train(model, stream(args, SUITES[args.suite], args.seed, args.batch, data_set,
                                   args.tasks), args.steps, args.lr, args.warmup,
                     method.extra_loss, args.autocast == "bf16", start, checkpoint,
                     args.ckpt_every)
    except FloatingPointError as e:
        discard(ckpt)
        flags = ", ".join(["--lr", "--alpha", *method.hint])
        raise SystemExit(f"error: {e} of {args.method}: lower {flags}, or raise --warmup")
    finally:
        if args.compile:
            del model.gpt.features                    # evaluate eagerly: the hooks fire again


def eval_splits(args, tasks, data_set):
    """eval-samples per task of the training set (finite: its first of each task; unlimited: a
    fresh draw), the validation and test draws and the shifted test draw (--tasks: theirs)."""
    m = args.eval_samples * len(tasks)                # samples per split
    kw = dict(L=L, rho=args.rho, device=args.device)
    splits = {"train": data_set}
    if data_set is None:
        splits["train"] = make_batch(tasks, m, data_seed("train-set", args.seed), **kw)
    else:
        j = torch.arange(len(data_set["idx"]), device=args.device) // len(tasks)  # j of its task
        keep = j < set_sizes(args, tasks).clamp(max=args.eval_samples).to(args.device)[
            data_set["task"]]
        splits["train"] = {k: v[keep] for k, v in data_set.items()}
    for split, seed, shifted in [("val", "val", 0), ("test", "test", 0), ("shift", "test", 1)]:
        splits[split] = make_batch(tasks, m, data_seed(seed, 0), shifted=shifted, **kw)
    return {k: only(b, tasks, args.tasks) for k, b in splits.items()}


def test_sample(args, tasks, per_task):               # test samples of the tasks trained
    b = make_batch(tasks, per_task * len(tasks), data_seed("test", 0), L, args.rho,
                   device=args.device)
    return only(b, tasks, args.tasks)


def only(b, tasks, chosen):                           # the chosen tasks' samples (None: all)
    if chosen is None:
        return b
    keep = torch.isin(b["task"], torch.tensor([tasks.index(t) for t in chosen],
                                              device=b["task"].device))
    return {k: v[keep] for k, v in b.items()}


@torch.no_grad()
def what_it_learned(method, b, tasks):
    """What a method's task-specific parts learned (per layer, or task x head / B_i / module;
    a row per task of the suite, --tasks or not) and what it monitors (L_align), logged, in plain
    numbers for metrics.json."""
    learned = {} if method.learned is None else method.learned(b)
    for k, v in learned.items():
        if isinstance(v, dict):
            log(f"{k} per layer: " + ", ".join(f"{x:.3f}" for x in v.values() if x is not None))
        elif v.dim() == 0:                            # one value, e.g. L_align
            learned[k] = v.item()
            log(f"{k}: {learned[k]:.4g}")
        else:
            learned[k] = v.tolist()                   # a row per task of the suite, or one
            rows = tasks if len(learned[k]) == len(tasks) else ["(one id)"]   # --shared-id
            log(f"{k}, task x column:\n" + "\n".join(f"  {t:<12}" + "".join(
                f"{x:8.3f}" for x in row) for t, row in zip(rows, learned[k])))
    return learned


def write_results(folder, state, metrics):
    """adapter.pt, then metrics.json: a finished run has both, or neither is left. Then the
    checkpoint goes. Protects a result that is all there or not at all."""
    adapter = os.path.join(folder, "adapter.pt")
    try:
        save(adapter, state)
        save(os.path.join(folder, "metrics.json"), json.dumps(metrics, indent=1))
    except SystemExit:
        discard(adapter)
        raise
    discard(os.path.join(folder, "ckpt.pt"))


def save(path, obj):
    """Written whole or not at all (this process's <path>.<pid>.tmp, flushed to disk, renamed), by
    process 0. Protects from a truncated file that a later run trusts; a failed write stops the
    run naming the file, and no temporary file is left (on Ctrl-C neither)."""
    if RANK != 0:
        return
    tmp = f"{path}.{os.getpid()}.tmp"                 # its own: two writers never share one
    try:
        with open(tmp, "wb") as f:
            f.write(obj.encode()) if isinstance(obj, str) else torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        raise SystemExit(f"error: cannot write {path}: {e}")
    finally:
        discard(tmp)


def discard(path):                                    # by process 0, which writes; if it is there
    if RANK == 0:
        with contextlib.suppress(OSError):
            os.remove(path)


def load(path, kind, expected, advice):
    """A file train.py wrote (kind: "metrics", "checkpoint" or "base") with the `expected`
    settings and, a .pt file, the digest written with it; or one line that names it and what is
    wrong. Protects a run from another run's file, and from a damaged one (a bad disk or copy)."""
    tables = {"metrics": ["accuracy"], "checkpoint": ["trainable", "opt"],
              "base": ["state_dict"]}[kind] + ["settings"]
    try:
        obj = json.load(open(path)) if kind == "metrics" else torch.load(path, "cpu",
                                                                         weights_only=True)
        if kind == "checkpoint" and not {"step", "rng", "losses"} <= set(obj):   # resume reads
            raise KeyError("step, rng or losses")
        parts = [obj[k] for k in tables]
        parts += list((obj.get("accuracy") or {}).values())   # a split's accuracies: a table too
        if not all(isinstance(x, dict) for x in parts):       # e.g. an accuracy of null
            raise ValueError("not one")
        changed = {k: (obj["settings"].get(k), v) for k, v in json.loads(json.dumps(expected))
                   .items() if obj["settings"].get(k) != v}
    except Exception as e:
        raise SystemExit(f"error: cannot read {path} as a {kind} file of train.py "
                         f"({type(e).__name__})")
    if changed:
        raise SystemExit(f"error: {path} has other settings (there vs now: {changed}); {advice}")
    if kind != "metrics" and obj.get("digest") != digest(obj):
        raise SystemExit(f"error: {path} is damaged: what it holds does not match the digest "
                         f"written with it (or an older train.py wrote it); {advice}")
    return obj


def digest(obj):
    """sha256 of what a file holds but its digest: each key, each tensor's bytes, other values."""
    h = hashlib.sha256()

    def add(x):
        if isinstance(x, dict):
            for k in sorted(set(x) - {"digest"}, key=str):
                h.update(repr(k).encode())
                add(x[k])
        elif torch.is_tensor(x):
            h.update(repr((x.dtype, x.shape)).encode())
            h.update(x.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
        else:
            h.update(repr(x).encode())
    add(obj)
    return h.hexdigest()


def remove_stale(*paths):
    """What a killed writer left, <path>.<pid>.tmp whose process is gone (signal 0 only asks):
    protects the folders from half-written files piling up; never a user's file nor a live
    writer's."""
    for path in paths:
        for tmp in glob.glob(glob.escape(path) + ".*.tmp"):
            pid = tmp[len(path) + 1:-len(".tmp")]
            try:
                if pid.isdigit() and os.name == "posix":  # elsewhere no harmless probe: kept
                    os.kill(int(pid), 0)
            except ProcessLookupError:
                discard(tmp)
            except (OSError, OverflowError):          # there, another user's; or not a pid
                pass


def writable(folder):                 # protects the pre-training: fail before it, not after
    probe = os.path.join(folder, f".writable{os.getpid()}")   # one per process: no race
    try:
        os.makedirs(folder, exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"error: cannot write in {folder}: {e}")


def main():
    args = get_args()
    if WORLD > 1:                                     # launched by torchrun: one process per rank
        torch.distributed.init_process_group("nccl" if args.device == "cuda" else "gloo")
        if args.device == "cuda":
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
    try:
        run(args)
    except RuntimeError as e:                         # the allocator's: one line, what to lower
        if not any(m in str(e) for m in ("out of memory", "allocate memory", "enough memory")):
            raise
        raise SystemExit(f"error: out of memory on {args.device}: lower --batch (samples per "
                         "step), or --width and --layers (the model)")
    finally:
        if WORLD > 1:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
