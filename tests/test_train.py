import json
import math
import os
import subprocess
import sys

import pytest
import torch

import lora
import train

TINY = "--width 32 --layers 2 --base-steps 200 --base-batch 128 --batch 64 --eval-samples 200 --ckpt-every 0"


@pytest.fixture(scope="session")
def out(tmp_path_factory):
    """One output folder (so one cached tiny base) shared by the tests that train."""
    return str(tmp_path_factory.mktemp("out"))


def args_for(out, extra=""):
    return train.get_args(f"{TINY} --out {out} {extra}".split())


# ----------------------------------------------------------------------------- data

def test_batches_are_deterministic_and_seeded():
    tasks = train.SUITES["default"]
    a, b = train.make_batch(tasks, 64, seed=5), train.make_batch(tasks, 64, seed=5)
    c = train.make_batch(tasks, 64, seed=6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["idx"], c["idx"])


def test_batch_layout_and_answers():
    L, tasks = 6, train.TASKS[:4] + train.TASKS[6:]      # every sequence task
    b = train.make_batch(tasks, 91, seed=0, L=L)
    assert b["idx"].shape == (91, 2 * L + 1) and b["targets"].shape == (91, 2 * L + 1)
    assert torch.equal(torch.bincount(b["task"]), torch.full((len(tasks),), 91 // len(tasks)))
    ref = {"copy": lambda x: x, "reverse": lambda x: x[::-1], "sort": sorted,
           "sort_desc": lambda x: sorted(x, reverse=True), "inc": lambda x: [(d + 1) % 10 for d in x],
           "dec": lambda x: [(d - 1) % 10 for d in x], "rotate": lambda x: x[1:] + x[:1]}
    for i in range(91):
        t = tasks[b["task"][i]]
        row = b["idx"][i].tolist()
        assert row[0] == 12 + train.TASKS.index(t) and row[L + 1] == train.SEP
        x = row[1:L + 1]
        assert b["targets"][i, L + 1:].tolist() == list(ref[t](x))
        assert (b["targets"][i, :L + 1] == -100).all()


def test_classification_labels_and_noise():
    tasks = ["first_ge5", "has7"]
    n, L, noise = 40_000, 8, 0.25
    b = train.make_batch(tasks, n, seed=1, L=L, noise=noise)
    x, lab, clean = b["idx"][:, 1:L + 1], b["targets"][:, L + 1], b["clean"][:, L + 1]
    assert (b["targets"][:, L + 2:] == -100).all()        # one answer token, the rest is padding
    a = b["task"] == 0
    assert torch.equal(lab[a], (x[a, 0] >= 5).long()) and torch.equal(lab[a], clean[a])
    bb = b["task"] == 1
    assert torch.equal(clean[bb], (x[bb] == 7).any(1).long())          # clean label = contains a 7
    flipped = (lab[bb] != clean[bb]).float().mean().item()
    assert abs(flipped - noise) < 4 * math.sqrt(noise * (1 - noise) / bb.sum().item())


@pytest.mark.parametrize("shifted", [False, True])
def test_agreement_rate_per_environment_matches_rho(shifted):
    rho, rho_shift, n, L = (0.8, 0.95), 0.1, 60_000, 8
    b = train.make_batch(["has7"], n, seed=2, L=L, rho=rho, rho_shift=rho_shift, shifted=shifted)
    agree = (b["idx"][:, 1] >= 5).long() == b["targets"][:, L + 1]
    envs = [2] if shifted else [0, 1]
    assert set(b["env"].unique().tolist()) == set(envs)
    for e in envs:
        r = (rho + (rho_shift,))[e]
        m = b["env"] == e
        rate = agree[m].float().mean().item()
        assert abs(rate - r) < 4 * math.sqrt(r * (1 - r) / m.sum().item()), (e, rate, r)


def test_data_is_made_on_the_requested_device():
    b = train.make_batch(train.SUITES["default"], 8, seed=0, device="cpu")
    assert all(v.device.type == "cpu" for v in b.values())

# ----------------------------------------------------------------------------- model and runs


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = train.GPT(train.GPTConfig(block=9, width=16, layers=2, heads=2)).eval()
    idx = torch.randint(0, 10, (2, 9))
    idx2 = idx.clone()
    idx2[:, 5:] = 3
    torch.testing.assert_close(model(idx)[:, :5], model(idx2)[:, :5])


@pytest.mark.parametrize("method", ["none", "full", "lora", "multihead", "multihead --no-router",
                                    "mtl", "align", "spurious"])
def test_smoke_run_per_method(out, method, capsys):
    m = train.run(args_for(out, f"--method {method} --steps 6"))
    method = method.replace(" --no-router", "-norouter")
    run_dir = os.path.join(out, f"default-{method}-seed0")
    saved = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert saved["method"] == method and set(saved["accuracy"]["id"]) >= set(train.SUITES["default"])
    adapter = torch.load(os.path.join(run_dir, "adapter.pt"))
    if method == "lora":
        d, r, layers = 32, 8, 2                      # r * (d_in + d_out) over q, k, v, o, up, down
        assert m["trainable"] == layers * r * (4 * 2 * d + 2 * (d + 4 * d))
        assert adapter and all(".lora_" in k for k in adapter)
        assert "trainable parameters" in capsys.readouterr().out
        return
    elif method == "none":
        assert m["trainable"] == 0 and adapter == {}
    elif method == "full":
        assert m["trainable"] == m["base_params"]
    else:                                            # adapters only, all of them saved
        assert 0 < m["trainable"] < m["base_params"]
        assert sum(v.numel() for v in adapter.values()) == m["trainable"]
    out_text = capsys.readouterr().out
    if method == "multihead":
        assert "head similarity" in out_text and "routing weight" in out_text
        assert len(m["learned"]["routing"]) == 4
    if method == "multihead-norouter":
        assert "head similarity" in out_text and "routing" not in out_text
    if method == "mtl":
        assert "mixing weights" in out_text and len(m["learned"]["mixing_weights"]) == 4
    if method == "spurious":
        assert "graph" in out_text and len(m["learned"]["graph"]) == 4


def test_base_is_cached_and_a_mismatch_is_reported(out, capsys):
    train.run(args_for(out, "--method none"))
    train.run(args_for(out, "--method none"))
    assert "pre-training the base" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="other settings"):
        train.run(args_for(out, "--method none --width 48"))


def test_resume_gives_the_same_result(tmp_path, monkeypatch):
    base_out = tmp_path / "a"
    ref = args_for(base_out, "--method lora --steps 12 --dropout 0.1")
    train.run(ref)
    want = torch.load(base_out / "default-lora-seed0" / "adapter.pt")

    args = args_for(base_out, "--method lora --steps 12 --dropout 0.1 --ckpt-every 4 --seed 0")
    args.out = str(tmp_path / "b")
    os.makedirs(args.out)
    os.link(base_out / "base.pt", tmp_path / "b" / "base.pt")
    real, calls = train.make_batch, []

    def crash_at_step_6(*a, **kw):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(train, "make_batch", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train.run(args)
    monkeypatch.setattr(train, "make_batch", real)
    assert os.path.exists(tmp_path / "b" / "default-lora-seed0" / "ckpt.pt")
    args.resume = True
    train.run(args)
    got = torch.load(tmp_path / "b" / "default-lora-seed0" / "adapter.pt")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_nonfinite_loss_stops_with_a_hint(out, monkeypatch):
    monkeypatch.setattr(train.GPT, "forward", lambda self, idx: self.head(self.features(idx)) * float("nan"))
    with pytest.raises(SystemExit, match="lower --lr"):
        train.run(args_for(out, "--method lora --steps 3"))


@pytest.mark.parametrize("argv, msg", [("--method bogus", "invalid choice: 'bogus'"),
                                       ("--align-loss l2", "invalid choice: 'l2'"),
                                       ("--temperature 0", "--temperature must"),
                                       ("--heads 0", "--heads must"), ("--dropout 1", "--dropout"),
                                       ("--width 30 --modules 4", "--modules"),
                                       ("--suite nope", "invalid choice: 'nope'"),
                                       ("--rank 0", "--rank must be"), ("--rho 0.8", "exactly two"),
                                       ("--rho 0.8,1.5", "in \\[0, 1\\]"), ("--lr -1", "--lr must"),
                                       ("--width 30 --attn-heads 4", "divisible"),
                                       ("--clip -1", "--clip must"), ("--base-steps 0", "--base-steps must"),
                                       ("--batch 3", "too small"), ("--device tpu", "invalid choice: 'tpu'"),
                                       ("--invariance-weight inf", "--invariance-weight must"),
                                       ("--warmup -5", "--warmup must")])
def test_bad_command_lines_are_rejected(argv, msg, capsys):
    with pytest.raises(SystemExit):
        train.get_args(argv.split())
    import re
    assert re.search(msg, capsys.readouterr().err)


def test_unknown_target_is_a_clear_error(out):
    with pytest.raises(SystemExit, match="match no layer"):
        train.run(args_for(out, "--method lora --steps 2 --targets q,nope"))


def test_clean_label_of_task_b_is_learnable(out):
    """At rho 0.5 the first digit carries no information about B's label: LoRA must learn the
    feature itself and beat what the shortcut scores (about 50%)."""
    args = args_for(out, "--method lora --rho 0.5,0.5 --batch 128")
    model = train.build_model(args, train.get_base(args), n_tasks=1)
    train.train(model, args, ["has7"], 200, args.lr, "has7")
    acc = train.evaluate(model, args, ["has7"])
    assert acc["id"]["has7"] > acc["id"]["shortcut"] + 0.25
    assert acc["shift"]["has7"] > acc["shift"]["shortcut"] + 0.25


def test_short_run_learns_the_suite(out):
    m = train.run(args_for(out, "--method lora --steps 300 --batch 128"))
    acc = m["accuracy"]["id"]
    assert acc["inc"] > 0.9 and acc["first_ge5"] > 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["lora", "multihead", "mtl", "align", "spurious"])
def test_cuda_run_learns(tmp_path_factory, method):
    """bf16 autocast on the GPU: a short run of each adapter method still learns `inc`."""
    out = tmp_path_factory.getbasetemp() / "cuda-out"
    m = train.run(args_for(out, f"--method {method} --steps 300 --batch 128 --device cuda"))
    assert m["args"]["device"] == "cuda" and m["accuracy"]["id"]["inc"] > 0.9


@pytest.mark.parametrize("suite", ["default", "interference"])
def test_method_all_writes_one_table(out, suite, capsys):
    argv = f"{TINY} --out {out} --method all --seeds 2 --steps 2 --batch 20 --eval-samples 20 --suite {suite}".split()
    results = train.run_all(argv, train.get_args(argv))
    assert list(results)[:len(train.ALL)] == train.ALL and all(len(r) == 2 for r in results.values())
    assert [r["seed"] for r in results["mtl"]] == [0, 1]
    table = open(os.path.join(out, f"{suite}-all.md")).read()
    saved = json.load(open(os.path.join(out, f"{suite}-all.json")))
    for label in results:
        assert f"| {label} |" in table
    for label, rs in results.items():                # every run kept its own folder
        for r in rs:
            rank = "" if r["args"]["rank"] == 8 or label in ("none", "full") else f"-r{r['args']['rank']}"
            name = label.split()[0] + ("-norouter" if "no-router" in label else "") + rank
            saved_run = json.load(open(os.path.join(out, f"{suite}-{name}-seed{r['seed']}", "metrics.json")))
            assert saved_run["accuracy"] == r["accuracy"]
    if suite == "interference":                      # every adapter method has a LoRA of its size
        assert set(saved["pairs"]) == set(train.ALL[3:]) and "paired LoRA" in table
        for label, paired in saved["pairs"].items():
            n, m = results[label][0]["trainable"], results[paired][0]["trainable"]
            assert abs(n - m) <= results["lora"][0]["trainable"] / 8 / 2 + 1   # within half a rank
    else:
        assert "has7 shifted" in table and "±" in table
    assert "[16/16]" in capsys.readouterr().out


def test_torchrun_two_processes_match_one(out):
    """torchrun on CPU (gloo): 2 processes, each half of the same global batch, one writer."""
    flags = f"{TINY} --out {out} --method lora --steps 40 --eval-samples 100".split()
    one = train.run(train.get_args(flags))                   # also makes sure the base is cached
    os.remove(os.path.join(out, "default-lora-seed0", "metrics.json"))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launch = [torchrun] if os.path.exists(torchrun) else [sys.executable, "-m", "torch.distributed.run"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(launch + ["--standalone", "--nproc_per_node=2", "train.py"] + flags, cwd=root,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote ") == 1 and res.stdout.count("trainable parameters") == 1
    two = json.load(open(os.path.join(out, "default-lora-seed0", "metrics.json")))
    assert two["processes"] == 2 and one["processes"] == 1
    assert abs(two["loss"] - one["loss"]) < 0.25 * one["loss"], (one["loss"], two["loss"])
    assert abs(two["accuracy"]["id"]["inc"] - one["accuracy"]["id"]["inc"]) < 0.2
