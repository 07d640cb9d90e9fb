import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import train

TINY = "--width 32 --layers 2 --base-steps 200 --batch 64 --eval-samples 200 --ckpt-every 0"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def out(tmp_path_factory):
    """One output folder with one cached tiny base, shared by the tests that train."""
    return str(tmp_path_factory.mktemp("out"))


def args_for(out, extra=""):
    return train.get_args(f"{TINY} --out {out} --base {out}/base.pt {extra}".split())


def run_dir(args):
    return os.path.join(args.out, args.name)

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


def test_only_has7_samples_carry_an_environment():
    tasks = train.SUITES["default"]
    b = train.make_batch(tasks, 400, seed=0)
    is_b = b["task"] == tasks.index("has7")
    assert (b["env"][~is_b] == -1).all() and set(b["env"][is_b].tolist()) == {0, 1}
    every = train.make_batch(tasks, 400, seed=0, env_tasks="all")
    assert set(every["env"][~is_b].tolist()) == {0, 1}
    assert all(torch.equal(b[k], every[k]) for k in b if k != "env")   # the same data otherwise
    assert (train.make_batch(train.SUITES["interference"], 50, seed=0)["env"] == -1).all()

# ----------------------------------------------------------------------------- model and runs


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = train.GPT(train.GPTConfig(block=9, width=16, layers=2, heads=2)).eval()
    idx = torch.randint(0, 10, (2, 9))
    idx2 = idx.clone()
    idx2[:, 5:] = 3
    torch.testing.assert_close(model(idx)[:, :5], model(idx2)[:, :5])


METHOD_RUNS = ["none", "full", "lora", "multihead", "multihead --no-router",
               "multihead --no-router --init offset", "mtl", "align", "align --align-loss mmd", "spurious"]


@pytest.mark.parametrize("method", METHOD_RUNS)
def test_smoke_run_per_method(out, method, capsys):
    args = args_for(out, f"--method {method} --steps 6")
    m = train.run(args)
    saved = json.load(open(os.path.join(run_dir(args), "metrics.json")))
    assert saved["name"] == args.name and set(saved["accuracy"]["test"]) >= set(train.SUITES["default"])
    assert saved["settings"]["method"] == method.split()[0] and saved["accuracy"] == m["accuracy"]
    adapter = torch.load(os.path.join(run_dir(args), "adapter.pt"))
    text = capsys.readouterr().out
    assert "trainable parameters" in text and "examples" in text and "model:" in text
    if method == "none":
        assert m["trainable"] == 0 and adapter == {}
    elif method == "full":
        assert m["trainable"] == m["base_params"]
    elif method == "lora":
        d, r, layers = 32, 8, 2                      # r * (d_in + d_out) over q, k, v, o, up, down
        assert m["trainable"] == layers * r * (4 * 2 * d + 2 * (d + 4 * d))
        assert adapter and all(".lora_" in k for k in adapter)
    else:                                            # adapters only, all of them saved
        assert 0 < m["trainable"] < m["base_params"]
        assert sum(v.numel() for k, v in adapter.items() if "lora_A0" not in k and "lora_B0" not in k) \
            == m["trainable"]
    if method == "multihead":
        assert "head similarity" in text and "routing weight" in text and len(m["learned"]["routing"]) == 4
    if method.startswith("multihead --no-router"):
        assert "head similarity" in text and "routing" not in text
    if method == "mtl":
        assert "p_t" in text and len(m["learned"]["mixing_weights"]) == 4
    if method == "spurious":
        assert "graph" in text and len(m["learned"]["graph"]) == 4


def test_base_is_cached_and_a_mismatch_is_reported(out, capsys):
    train.run(args_for(out, "--method none"))
    capsys.readouterr()
    train.run(args_for(out, "--method none --eval-samples 20"))
    assert "pre-training the base" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="other settings"):
        train.run(args_for(out, "--method none --width 48"))


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", "foreign"])
def test_unreadable_base_is_one_clear_line(tmp_path, content):
    base = tmp_path / "base.pt"
    if content == "foreign":
        torch.save({"weights": torch.zeros(2)}, base)
    else:
        base.write_bytes(content)
    args = train.get_args(f"{TINY} --out {tmp_path} --base {base} --method lora".split())
    with pytest.raises(SystemExit, match=re.escape(str(base)) + ".*delete it"):
        train.run(args)


def test_runs_with_other_settings_keep_their_own_folders(out, capsys):
    a, b = args_for(out, "--method lora --steps 4"), args_for(out, "--method lora --steps 2")
    ma, mb = train.run(a), train.run(b)
    assert run_dir(a) != run_dir(b) and "steps4" in a.name and "steps2" in b.name
    for args, m in [(a, ma), (b, mb)]:               # both results kept
        assert json.load(open(os.path.join(run_dir(args), "metrics.json")))["settings"]["steps"] == \
            m["settings"]["steps"]
    again = train.run(args_for(out, "--method lora --steps 4"))       # done already: reported, kept
    assert again["accuracy"] == ma["accuracy"] and "already holds this run" in capsys.readouterr().out
    assert train.get_args(["--method", "lora"]).name == "default-lora-seed0"


def test_a_folder_with_other_settings_is_refused_not_replaced(out):
    args = args_for(out, "--method lora --steps 3")
    train.run(args)
    path = os.path.join(run_dir(args), "metrics.json")
    before = open(path).read()
    other = args_for(out, "--method lora --steps 3 --autocast bf16")   # not in the name, but differs
    with pytest.raises(SystemExit, match="other settings.*autocast"):
        train.run(other)
    assert open(path).read() == before


@pytest.mark.parametrize("bad_out", ["file", "/proc/nope", "readonly"])
def test_unwritable_out_fails_before_any_training(tmp_path, bad_out, capsys):
    if bad_out == "file":
        bad_out = tmp_path / "a-file"
        bad_out.write_text("x")
    elif bad_out == "readonly":
        bad_out = tmp_path / "ro"
        bad_out.mkdir()
        bad_out.chmod(0o500)
        if os.access(bad_out, os.W_OK):
            pytest.skip("running as root: a read-only folder is still writable")
    args = train.get_args(f"{TINY} --out {bad_out} --base {tmp_path}/base.pt --method lora".split())
    with pytest.raises(SystemExit, match="cannot write"):
        train.run(args)
    assert not (tmp_path / "base.pt").exists() and "pre-training" not in capsys.readouterr().out


def interrupt(monkeypatch, args, at_batch):
    """Run `args` and stop it like a Ctrl-C when it asks for batch number `at_batch`."""
    real, calls = train.make_batch, []

    def make_batch(*a, **kw):
        calls.append(1)
        if len(calls) == at_batch:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(train, "make_batch", make_batch)
    with pytest.raises(KeyboardInterrupt):
        train.run(args)
    monkeypatch.setattr(train, "make_batch", real)


def test_resume_gives_the_same_result(tmp_path, monkeypatch, out):
    flags = "--method lora --steps 12 --dropout 0.1 --ckpt-every 4"
    ref = args_for(out, flags)
    train.run(ref)
    want = torch.load(os.path.join(run_dir(ref), "adapter.pt"))
    args = train.get_args(f"{TINY} {flags} --out {tmp_path} --base {out}/base.pt".split())
    interrupt(monkeypatch, args, at_batch=7)                 # a kill in step 7
    with pytest.raises(SystemExit, match="unfinished run.*--resume"):
        train.run(args)                                     # never silently started over
    args.resume = True
    train.run(args)
    got = torch.load(os.path.join(run_dir(args), "adapter.pt"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_resume_names_differences_ignores_eval_and_extends_finished_runs(out, capsys):
    flags = "--method lora --seed 5 --ckpt-every 4"
    with pytest.raises(SystemExit, match="nothing to resume"):
        train.run(args_for(out, f"{flags} --steps 8 --resume"))
    short = args_for(out, f"{flags} --steps 8")
    train.run(short)
    long = train.run(args_for(out, f"{flags} --steps 12 --resume"))      # extends the 8-step run
    assert f"continuing {run_dir(short)}" in capsys.readouterr().out
    assert [s for s, _ in long["losses"]] == [4, 8, 12] and long["settings"]["steps"] == 12
    again = train.run(args_for(out, f"{flags} --steps 12 --resume --eval-samples 20"))  # no training
    assert again["losses"] == long["losses"] and again["settings"]["eval_samples"] == 20
    ckpt = os.path.join(run_dir(short), "ckpt.pt")
    os.remove(os.path.join(run_dir(short), "metrics.json"))             # unfinished again ...
    ck = torch.load(ckpt)
    ck["settings"]["lr"] = 1.0                                           # ... with another lr
    torch.save(ck, ckpt)
    with pytest.raises(SystemExit, match="other settings.*'lr': \\(1.0, 0.003\\)"):
        train.run(args_for(out, f"{flags} --steps 8 --resume"))


def test_base_pretraining_checkpoints_and_resumes(tmp_path, monkeypatch, out):
    flags = f"--width 16 --layers 1 --base-steps 60 --ckpt-every 20 --method none --eval-samples 20"
    ref = train.get_args(f"{flags} --out {tmp_path}/a --base {tmp_path}/a.pt".split())
    train.run(ref)
    args = train.get_args(f"{flags} --out {tmp_path}/b --base {tmp_path}/b.pt".split())
    interrupt(monkeypatch, args, at_batch=45)                # in pre-training's step 45
    assert torch.load(f"{tmp_path}/b.pt.ckpt")["step"] == 40
    train.run(args)
    a, b = torch.load(f"{tmp_path}/a.pt")["state_dict"], torch.load(f"{tmp_path}/b.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a) and not os.path.exists(f"{tmp_path}/b.pt.ckpt")


@pytest.mark.parametrize("method, flag", [("mtl", "--temperature"), ("align", "--align-weight"),
                                          ("lora", "--lr")])
def test_nonfinite_loss_stops_with_a_hint_naming_the_flags(out, monkeypatch, method, flag):
    real = train.GPT.features
    monkeypatch.setattr(train.GPT, "features", lambda self, idx: real(self, idx) * float("nan"))
    with pytest.raises(SystemExit, match=f"became nan.*{flag}"):
        train.run(args_for(out, f"--method {method} --steps 3 --seed 9"))


@pytest.mark.parametrize("argv, msg", [("--method bogus", "invalid choice: 'bogus'"),
                                       ("--align-loss l2", "invalid choice: 'l2'"),
                                       ("--suite nope", "invalid choice: 'nope'"),
                                       ("--rho 0.8", "two numbers"), ("--rho 0.8,1.5", "two numbers"),
                                       ("--rho a,b", "comma-separated"), ("--lr -1", "--lr must"),
                                       ("--lr 1e300", "--lr must"), ("--lr nan", "--lr must"),
                                       ("--method align --align-weight inf", "--align-weight must"),
                                       ("--width 30 --attn-heads 4", "divide"),
                                       ("--base-steps 0", ">= 1"), ("--batch 3", "at least one sample"),
                                       ("--device tpu", "invalid choice: 'tpu'"),
                                       ("--method spurious --invariance-weight inf", "--invariance-weight"),
                                       ("--warmup -5", "--warmup"),
                                       ("--method lora --lora-heads 4", "--lora-heads: not a setting"),
                                       ("--method full --rank 4", "--rank: not a setting"),
                                       ("--method mtl --align-weight 1", "--align-weight: not a setting")])
def test_bad_command_lines_are_rejected(argv, msg, capsys):
    with pytest.raises(SystemExit):
        train.get_args(argv.split())
    assert re.search(msg, capsys.readouterr().err)


@pytest.mark.parametrize("flags, msg", [("--method lora --targets q,nope", "match no layer"),
                                        ("--method lora --alpha 1e300", "alpha"),
                                        ("--method lora --rank 0", "rank"),
                                        ("--method mtl --temperature 0", "tau"),
                                        ("--method multihead --lora-heads 0", "n_heads"),
                                        ("--method spurious --modules 5", "n_modules"),
                                        ("--method multihead --init offset", "offset")])
def test_bad_adapter_settings_stop_before_pretraining(tmp_path, flags, msg):
    args = train.get_args(f"{TINY} --out {tmp_path} --base {tmp_path}/base.pt {flags}".split())
    with pytest.raises(SystemExit, match=msg):
        train.run(args)
    assert not (tmp_path / "base.pt").exists()


def test_targets_are_stripped_and_a_huge_rank_is_warned_about(out, capsys):
    assert train.get_args(["--targets", "q, v ,"]).targets == ["q", "v"]
    train.run(args_for(out, "--method lora --steps 2 --rank 40 --targets up"))
    assert "warning: --rank 40 is above the width 32" in capsys.readouterr().out


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        train.get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for s in ["(default: 1000)", "(default: q,k,v,o,up,down)", "auto: cuda", "--lora-heads",
              "(default 2r)", "q k v o (attention) up down (MLP)"]:
        assert s in text, s


def test_clean_label_of_task_b_is_learnable(out):
    """At rho 0.5 the first digit carries no information about B's label: LoRA must learn the
    feature itself and beat what the shortcut scores (about 50%)."""
    args = args_for(out, "--method lora --rho 0.5,0.5 --batch 128")
    model = train.build_model(args, train.get_base(args), n_tasks=1)
    train.train(model, args, ["has7"], 200, args.lr, "has7")
    acc = train.evaluate(model, args, ["has7"])
    assert acc["test"]["has7"] > acc["test"]["shortcut"] + 0.25
    assert acc["shift"]["has7"] > acc["shift"]["shortcut"] + 0.25


def test_short_run_learns_the_suite(out):
    m = train.run(args_for(out, "--method lora --steps 300 --batch 128"))
    acc = m["accuracy"]["test"]
    assert acc["inc"] > 0.9 and acc["first_ge5"] > 0.9
    assert len(m["losses"]) == 12 and m["losses"][-1][1] < m["losses"][0][1]   # every 25 steps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["lora", "multihead", "mtl", "align", "spurious"])
def test_cuda_run_learns(tmp_path_factory, method):
    """bf16 autocast on the GPU: a short run of each adapter method still learns `inc`."""
    out = tmp_path_factory.getbasetemp() / "cuda-out"
    m = train.run(args_for(out, f"--method {method} --steps 300 --batch 128 --device cuda"))
    assert m["settings"]["device"] == "cuda" and m["settings"]["autocast"] == "bf16"
    assert m["accuracy"]["test"]["inc"] > 0.9


def test_torchrun_two_processes_match_one(out):
    """torchrun on CPU (gloo): 2 processes, each half of the same global batch, one writer."""
    flags = f"{TINY} --out {out} --base {out}/base.pt --method lora --steps 40 --eval-samples 100".split()
    one = train.run(train.get_args(flags))                   # also makes sure the base is cached
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launch = [torchrun] if os.path.exists(torchrun) else [sys.executable, "-m", "torch.distributed.run"]
    res = subprocess.run(launch + ["--standalone", "--nproc_per_node=2", "train.py"] + flags, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote ") == 1 and res.stdout.count("trainable parameters") == 1
    two = json.load(open(os.path.join(out, one["name"] + "-procs2", "metrics.json")))
    assert two["settings"]["processes"] == 2 and one["settings"]["processes"] == 1
    assert abs(two["loss"] - one["loss"]) < 0.25 * one["loss"], (one["loss"], two["loss"])
    assert abs(two["accuracy"]["test"]["inc"] - one["accuracy"]["test"]["inc"]) < 0.2
