"""The controls behind each verdict (benchmarks/claims.py --regime controls): a task trained
alone sees the same samples as in the mix; the related suite; MTL-LoRA's ablations (one shared
task id, Lam_t frozen, LoRA-Split); Align-LoRA at weight 0 is LoRA; HydraLoRA without its router
is LoRA; the verdict against LoRA at its best setting is chosen on validation, never on test."""
import json
import os
import sys

import pytest
import torch

import mtl_lora
import multihead_lora
import lora
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import claims  # noqa: E402

TINY = "--width 32 --layers 2 --base-steps 200 --batch 64 --eval-samples 200 --ckpt-every 0"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return str(tmp_path_factory.mktemp("out"))


def args_for(out, extra=""):
    return train.get_args(f"{TINY} --out {out} {extra}".split())


@pytest.mark.parametrize("finite", [False, True])
def test_a_task_alone_sees_the_same_samples_as_in_the_mix(finite):
    flags = "--train-samples 1024,inc=64 " if finite else ""
    mix = train.get_args(flags.split())
    alone = train.get_args((flags + "--tasks inc").split())
    tasks = train.SUITES["default"]
    data_set = train.finite_set(mix, tasks)
    both = train.stream(mix, tasks, 0, 256, data_set)
    one = train.stream(alone, tasks, 0, 256, data_set, alone.tasks)
    for step in [0, 7]:
        b, a = both(step), one(step)
        inc = b["task"] == tasks.index("inc")
        assert len(a["idx"]) == 64 and (a["task"] == tasks.index("inc")).all()
        for k in b:
            assert torch.equal(a[k], b[k][inc]), k                  # the same samples, in order


def test_a_task_alone_is_trained_and_reported_alone(out, capsys):
    m = train.run(args_for(out, "--method lora --steps 4 --warmup 1 --tasks inc,sort "
                                "--train-samples 128,inc=32"))
    assert "-taskssort+inc-" in m["name"]                             # suite order
    assert all(set(split) == {"sort", "inc"} for split in m["accuracy"].values())
    assert set(m["epochs"]) == {"sort", "inc"} and m["epochs"]["inc"] == 4 * 64 / 4 / 32
    text = capsys.readouterr().out
    assert "first_ge5" not in text and "shortcut" not in text


def test_the_related_suite_sorts_three_digit_ranges_with_borrowed_task_tokens():
    tasks = train.SUITES["related"]
    b = train.make_batch(tasks, 600, seed=5)
    tokens = set()
    for i, (t, (lo, hi)) in enumerate(zip(tasks, [(0, 10), (0, 5), (5, 10)])):
        x = b["idx"][b["task"] == i, 1:train.L + 1]
        assert lo == x.min() and x.max() == hi - 1                  # its own inputs
        assert torch.equal(b["clean"][b["task"] == i, train.L + 1:], x.sort(1).values)  # sorted
        tokens |= set(b["idx"][b["task"] == i, 0].tolist())
    assert len(tokens) == 3 and max(tokens) < train.GPTConfig().vocab   # the base's vocabulary
    assert train.GPTConfig().vocab == 12 + 9                          # unchanged: the base stays
    default = train.make_batch(train.SUITES["default"], 64, seed=5)   # other suites' draws stay
    assert default["idx"][:, 1:9].max() == 9 and default["idx"][:, 0].unique().tolist() == \
        [14, 15, 16, 17]


def test_split_transforms_make_one_lora_of_rank_r_over_T_per_task():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12, bias=False))
    mtl_lora.add_mtl_lora(model, 4, ["0"], r=8, n_up=1)
    layer = model[0]
    train.freeze_lambda(layer, "split")
    torch.nn.init.normal_(layer.lora_B)
    x, t = torch.randn(8, 5, 16), torch.arange(8) % 4
    with mtl_lora.task_ids(model, t):
        out = model(x)
    A, B = layer.lora_A.weight, layer.lora_B[0]                       # (8, 16), (12, 8)
    for i in range(8):                                                # task k: rows 2k, 2k + 1
        rows = slice(2 * t[i], 2 * t[i] + 2)
        ref = x[i] @ layer.base.weight.T + layer.scaling * x[i] @ A[rows].T @ B[:, rows].T
        torch.testing.assert_close(out[i], ref)
    assert not layer.lora_lambda.requires_grad


def test_mtl_ablations_train_what_they_say(out):
    counts = {}
    for flags in ["", "--shared-id", "--task-transform identity",
                  "--n-up 1 --task-transform split --rank 16"]:
        args = args_for(out, f"--method mtl {flags}")
        gpt = train.GPT(train.model_config(args))
        method = train.adapt(gpt, args, 4)
        layers = mtl_lora.mtl_layers(gpt)
        counts[flags] = sum(p.numel() for p in method.model.parameters() if p.requires_grad)
        if flags == "--shared-id":
            assert layers[0].n_tasks == 1 and method.model.shared_id
        if "identity" in flags:
            assert torch.equal(layers[0].lora_lambda, torch.eye(8).expand(4, 8, 8))
        if "split" in flags:                                          # LoRA r=16's parameters
            lora_r16 = train.adapt(train.GPT(train.model_config(args)), args_for(
                out, "--method lora --rank 16"), 4)
            assert counts[flags] == sum(p.numel() for p in lora_r16.model.parameters()
                                        if p.requires_grad)
    assert counts[""] - counts["--task-transform identity"] == 4 * 8 * 8 * 12   # Lam: T r r
    torch.manual_seed(0)
    args = args_for(out, "--method mtl --shared-id")
    method = train.adapt(train.GPT(train.model_config(args)), args, 4)
    for layer in mtl_lora.mtl_layers(method.model):
        torch.nn.init.normal_(layer.lora_B)
    idx, task = torch.randint(0, 21, (6, 9)), torch.arange(6) % 4
    assert torch.equal(method.model(idx, task)[0], method.model(idx, torch.zeros_like(task))[0])


def test_align_at_weight_0_trains_exactly_as_lora_and_reports_its_alignment_loss(out):
    runs = {m: train.run(args_for(out, f"--method {m} --steps 8 --warmup 2 --seed 3"))
            for m in ["lora", "align --align-weight 0"]}
    a, b = runs["lora"], runs["align --align-weight 0"]
    assert a["losses"] == b["losses"] and a["accuracy"] == b["accuracy"]
    adapters = [torch.load(os.path.join(out, r["name"], "adapter.pt")) for r in (a, b)]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    assert b["learned"]["alignment_loss"] > 0 and "alignment_loss" not in a["learned"]


def test_hydra_without_its_router_is_lora_equal_heads_get_equal_gradients():
    """The router's ablation (the heads averaged, one dropout mask) starts with equal heads
    (zero) and gives each the same gradient, so it trains as one LoRA of the same rank."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 12)
    one = torch.nn.Sequential(torch.nn.Linear(16, 12))
    heads = torch.nn.Sequential(torch.nn.Linear(16, 12))
    for m in (one, heads):
        m[0].load_state_dict(base.state_dict())
    lora.add_lora(one, ["0"], r=4, alpha=8)
    multihead_lora.add_multihead_lora(heads, ["0"], r=4, alpha=8, n_heads=3, router=False)
    with torch.no_grad():
        heads[0].lora_A.weight.copy_(one[0].lora_A.weight)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
            for m in (one, heads)]
    for step in range(20):
        x, y = torch.randn(32, 16), torch.randn(32, 12)
        for m, opt in zip((one, heads), opts):
            opt.zero_grad()
            (m(x) - y).square().mean().backward()
            opt.step()
    x = torch.randn(32, 16)
    torch.testing.assert_close(heads(x), one(x), rtol=1e-4, atol=1e-5)
    B = heads[0].lora_B                                               # (N, d_out, r)
    assert torch.equal(B[0], B[1]) and torch.equal(B[1], B[2])


def test_mtl_loras_mixing_weights_start_close_to_one_hot_at_tau_0_1():
    """With the authors' init (w ~ kaiming, tau 0.1) each task starts assigned mostly to one
    up-projection at random; at tau 1 the start is near uniform."""
    torch.manual_seed(0)
    top = {tau: torch.cat([mtl_lora.MTLLoRALinear(torch.nn.Linear(8, 8), 4, r=2, tau=tau)
                           .mixing().max(-1).values for _ in range(200)]) for tau in (0.1, 1.0)}
    assert top[0.1].mean() > 0.8 and (top[0.1] > 0.5).float().mean() > 0.95
    assert top[1.0].mean() < 0.5


def fake(label, i, val=0.5, test=0.5):
    suite, flags, n = claims.CONTROLS[label]
    tasks = train.SUITES[suite]
    acc = {s: dict.fromkeys(tasks, v) for s, v in [("val", val), ("test", test + 0.01 * i),
                                                   ("train", 0.9), ("shift", 0.5)]}
    return {"suite": suite, "seed": i, "accuracy": acc,
            "learned": {"alignment_loss": 0.1 * (i + 1)}, "settings": {"train_samples": None}}


def test_every_control_row_has_its_runs_and_a_verdict():
    results = {label: [fake(label, i) for i in range(n)]
               for label, (suite, flags, n) in claims.CONTROLS.items()}
    lines = claims.claims_table(results, claims.CLAIMS_CONTROLS).splitlines()[2:]
    assert len(lines) == len(claims.CLAIMS_CONTROLS)
    assert all(r.endswith(("holds here |", "does not hold here |", "spread too wide) |"))
               for r in lines)
    sweep = claims.sweep_table(results).splitlines()[2:]
    assert len(sweep) == 10 and "| 0.2 |" in sweep[3] and "0.3" in sweep[3]


def test_the_best_lora_is_chosen_on_validation_never_on_test():
    results = {"mtl low": [fake("mtl low", i, test=0.70) for i in range(3)],
               "lora low": [fake("lora low", i, val=0.60, test=0.50) for i in range(3)],
               "lora low d0.1": [fake("lora low d0.1", i, val=0.55, test=0.90) for i in range(3)]}
    row = ("MTL-LoRA", "claim", "setting", claims.low_task, "mtl low", claims.BEST["default"])
    line = claims.claims_table(results, [row]).splitlines()[2]
    assert "vs lora low (the best on validation of lora low and lora low d0.1): 51.0" in line
    assert "holds here" in line                                       # dropout 0: best on val


def test_a_row_pairs_the_seeds_both_settings_have_and_says_so():
    results = {"mtl low": [fake("mtl low", i, test=0.90 - 0.1 * (i > 2)) for i in range(5)],
               "mtl low n=1": [fake("mtl low n=1", i, test=0.80) for i in range(3)]}
    row = ("MTL-LoRA", "claim", "setting", claims.low_task, "mtl low", "mtl low n=1")
    line = claims.claims_table(results, [row]).splitlines()[2]
    # seeds 0-2 only: 90.0, 91.0, 92.0 against 80.0, 81.0, 82.0 (seeds 3, 4 at 83, 84 left out)
    assert "mtl low: 91.0 ± 1.0 vs mtl low n=1: 81.0 ± 1.0; difference 10.0 ± 0.0 (the 3 " \
           "seeds of both)" in line, line
    results["mtl low"] = results["mtl low"][:3]
    assert "seeds of both" not in claims.claims_table(results, [row])


def test_each_regime_keeps_its_seed_counts():
    finite = claims.runs_for({"finite": claims.CLAIMS_FINITE})
    controls = claims.runs_for({"controls": claims.CLAIMS_CONTROLS})
    assert finite["lora low"][2] == 3 and controls["lora low"][2] == 5     # the finite table: 3
    assert controls["align low w0"][2] == 3 and "r align w0" in controls   # the sweeps' runs too
    assert not set(claims.runs_for({"unlimited": claims.CLAIMS})) & set(claims.CONTROLS)


def test_the_plan_counts_its_runs_and_their_time(tmp_path):
    runs = {k: claims.CONTROLS[k] for k in ["lora low", "lora low alone inc", "r align mmd"]}
    todo, cost = claims.plan(runs, None, ["--out", str(tmp_path)])
    assert len(todo) == 5 + 3 + 3
    assert cost == pytest.approx(5 * 1.0 + 3 * 0.25 + 3 * 3.0)
    folder = tmp_path / train.get_args(todo[0][1]).name             # a finished run: not again
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({}))
    assert len(claims.plan(runs, None, ["--out", str(tmp_path)])[0]) == 10
