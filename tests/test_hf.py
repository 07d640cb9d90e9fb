"""The method files inside the Hugging Face stack: tiny random-init BERT and LLaMA models built from
configs (no download), adapted by their HF layer names, saved with save_pretrained, trained by
transformers.Trainer, merged and unloaded, in bf16, and lora.py against HF peft."""
import contextlib
import copy
import os

import pytest
import torch
import torch.nn as nn

import align_lora
import lora
import mtl_lora
import multihead_lora as mh
import spurious_reg

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers")
load_file = pytest.importorskip("safetensors.torch").load_file     # comes with transformers

T = 2                                                      # tasks, for MTL-LoRA
TARGETS = {"bert": ["query", "value", "intermediate.dense"],
           "llama": ["q_proj", "v_proj", "up_proj", "down_proj"]}
NAMES = {"bert": [f"bert.encoder.layer.{i}.{n}" for i in range(2)
                  for n in ("attention.self.query", "attention.self.value", "intermediate.dense")],
         "llama": [f"model.layers.{i}.{n}" for i in range(2)
                   for n in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")]}
ADAPT = {   # method -> (adapt(model, targets), merge; None where the method cannot merge)
    "lora": (lambda m, t: lora.add_lora(m, t, r=4, alpha=8), lora.merge_lora),
    "hydra": (lambda m, t: mh.add_multihead_lora(m, t, r=4, n_heads=3), None),
    "mlora": (lambda m, t: mh.add_multihead_lora(m, t, r=4, n_heads=3, router=False),
              mh.merge_multihead_lora),
    "mlora-offset": (lambda m, t: mh.add_multihead_lora(m, t, r=4, router=False, init="offset"),
                     mh.merge_multihead_lora),
    "mtl": (lambda m, t: mtl_lora.add_mtl_lora(m, T, t, r=4, n_up=2, tau=0.5),
            lambda m: mtl_lora.merge_mtl_lora(m, 1)),
}
ADAPTER_STATE = {   # method -> (adapter tensors only, load them)
    "lora": (lora.lora_state_dict, lora.load_lora_state_dict),
    "hydra": (mh.multihead_state_dict, mh.load_multihead_state_dict),
    "mlora": (mh.multihead_state_dict, mh.load_multihead_state_dict),
    "mlora-offset": (mh.multihead_state_dict, mh.load_multihead_state_dict),
    "mtl": (mtl_lora.mtl_state_dict, mtl_lora.load_mtl_state_dict),
}
UNLOAD = {"lora": lambda m: lora.merge_and_unload_lora(m),
          "mlora": lambda m: mh.merge_and_unload_multihead_lora(m),
          "mlora-offset": lambda m: mh.merge_and_unload_multihead_lora(m),
          "mtl": lambda m: mtl_lora.merge_and_unload_mtl_lora(m, 1)}
ADAPTER_CLASSES = (lora.LoRALinear, mh.MultiHeadLoRALinear, mtl_lora.MTLLoRALinear)
TASK, TASK_1 = torch.tensor([0, 1, 0, 1]), torch.tensor([1, 1, 1, 1])   # TASK_1: the MTL merge's



def tiny(family, seed=0, **config):
    """A random-init model from a small config (hidden 32, 2 layers, 4 heads), in eval mode."""
    torch.manual_seed(seed)
    size = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=37, max_position_embeddings=64) | config
    if family == "bert":
        return transformers.BertForSequenceClassification(
            transformers.BertConfig(num_labels=3, **size)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **size)).eval()


def batch(family, n=4, seed=0):
    """input_ids, an int64 attention_mask with right padding in two samples, labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 99, (n, 6), generator=g)
    mask = torch.ones(n, 6, dtype=torch.long)
    mask[1, 4:], mask[n - 1, 3:] = 0, 0
    labels = (torch.randint(3, (n,), generator=g) if family == "bert"
              else ids.masked_fill(mask == 0, -100))
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def with_tasks(model, task):
    """MTL-LoRA's layers need the task ids; the other methods' layers need nothing."""
    return mtl_lora.task_ids(model, task) if mtl_lora.mtl_layers(model) else contextlib.nullcontext()


@torch.no_grad()
def logits(model, inputs, task=TASK):
    with with_tasks(model, task):
        return model(**inputs).logits


def adapted(family, method, seed=0):
    """The tiny model, adapted, with trained-looking (random, non-zero) adapters."""
    model = tiny(family, seed)
    ADAPT[method][0](model, TARGETS[family])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model


def all_adapters_gone(model):
    return not any(isinstance(m, ADAPTER_CLASSES) for m in model.modules())


def adapter_names(model):
    """The names of the adapters' own parameters (not their wrapped layers')."""
    return {f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, ADAPTER_CLASSES)
            for k, _ in m.named_parameters() if not k.startswith("base.")}


class TaskTrainer(transformers.Trainer):
    """A Trainer whose batches carry a "task" column, given to MTL-LoRA's layers as task ids."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        with with_tasks(model, inputs.pop("task")):
            return super().compute_loss(model, inputs, *args, **kwargs)


def train_args(out, **kw):
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        save_strategy="steps", save_steps=1, logging_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, remove_unused_columns=False, seed=0, **kw)   # keep the "task" column


def dataset(family, n=8):
    b = batch(family, n, seed=1)
    return [{k: v[i] for k, v in b.items()} | {"task": i % T} for i in range(n)]


# ------------------------------------------------------------------------------ adapt by HF names

@pytest.mark.parametrize("family", TARGETS)
@pytest.mark.parametrize("method", ADAPT)
def test_adapt_by_hf_names_and_the_start_is_the_base_model(family, method):
    model, inputs = tiny(family), batch(family)
    want = logits(model, inputs)
    assert ADAPT[method][0](model, TARGETS[family]) == NAMES[family]
    assert all(isinstance(model.get_submodule(n), ADAPTER_CLASSES) for n in NAMES[family])
    got = logits(model, inputs)
    if method == "mlora-offset":        # random heads, their start subtracted: equal up to rounding
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    else:
        assert torch.equal(got, want)


# --------------------------------------------------------------------- save_pretrained and reload

@pytest.mark.parametrize("family", TARGETS)
@pytest.mark.parametrize("method, merged", [(m, False) for m in ADAPT]
                         + [(m, True) for m in ADAPT if ADAPT[m][1]])
def test_save_pretrained_and_reload_into_the_base_adapted_alike(family, method, merged, tmp_path):
    base = tiny(family)
    base.save_pretrained(tmp_path / "base")
    model, inputs = adapted(family, method), batch(family)
    task = TASK_1 if merged else TASK                  # merged MTL-LoRA serves task 1
    want = logits(model, inputs, task)
    assert not torch.allclose(want, logits(base, inputs), atol=1e-3)       # the adapters act
    adapter = ADAPTER_STATE[method][0](model)
    if merged:
        ADAPT[method][1](model)
        torch.testing.assert_close(logits(model, inputs, task), want, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "adapted")
    saved = load_file(tmp_path / "adapted" / "model.safetensors")
    assert saved.keys() == model.state_dict().keys()

    cls = type(base)
    whole = cls.from_pretrained(tmp_path / "base").eval()         # the whole adapted state_dict
    ADAPT[method][0](whole, TARGETS[family])
    whole.load_state_dict(saved)
    assert all(m.merged == merged for m in whole.modules() if isinstance(m, ADAPTER_CLASSES))
    torch.testing.assert_close(logits(whole, inputs, task), want, atol=1e-5, rtol=1e-5)

    part = cls.from_pretrained(tmp_path / "base").eval()          # the adapter tensors only
    ADAPT[method][0](part, TARGETS[family])
    ADAPTER_STATE[method][1](part, adapter)
    torch.testing.assert_close(logits(part, inputs, task), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- Trainer

@pytest.mark.parametrize("method", ["lora", "hydra", "mlora", "mtl"])
def test_trainer_checkpoints_every_step_and_trains_only_the_adapters(method, tmp_path):
    model = tiny("bert")
    ADAPT[method][0](model, TARGETS["bert"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = TaskTrainer(model=model, args=train_args(tmp_path), train_dataset=dataset("bert"))
    trainer.train()
    assert trainer.state.global_step == 3
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == adapter_names(model)                # every adapter tensor, nothing else
    saved = load_file(tmp_path / "checkpoint-3" / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_trainer_resumes_lora_from_a_checkpoint(tmp_path):
    def run(out, resume=None):
        model = tiny("llama")
        lora.add_lora(model, TARGETS["llama"], r=4)
        trainer = TaskTrainer(model=model, args=train_args(out), train_dataset=dataset("llama"))
        trainer.train(resume_from_checkpoint=resume)
        assert trainer.state.global_step == 3
        return lora.lora_state_dict(model)

    full = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-1"))
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint-2", "checkpoint-3"]
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], atol=1e-6, rtol=1e-6)
    at_step_1 = load_file(tmp_path / "a" / "checkpoint-1" / "model.safetensors")
    assert not any(torch.allclose(at_step_1[k], full[k]) for k in full)   # trained on after it


# ------------------------------------------------------------------------------ merge and unload

@pytest.mark.parametrize("family", TARGETS)
@pytest.mark.parametrize("method", UNLOAD)
def test_merge_and_unload_gives_the_plain_hf_model_with_the_same_outputs(family, method, tmp_path):
    model, inputs = adapted(family, method), batch(family)
    want = logits(model, inputs, TASK_1)
    model = UNLOAD[method](model)
    assert all_adapters_gone(model)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in NAMES[family])
    assert model.state_dict().keys() == tiny(family).state_dict().keys()
    torch.testing.assert_close(logits(model, inputs), want, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)                   # reloads as the plain HF class
    plain = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(plain, inputs), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", TARGETS)
def test_hydralora_refuses_to_merge_and_changes_nothing(family):
    model, inputs = adapted(family, "hydra"), batch(family)
    want = logits(model, inputs)
    with pytest.raises(ValueError, match="cannot be merged"):
        mh.merge_and_unload_multihead_lora(model)
    assert all(isinstance(model.get_submodule(n), mh.MultiHeadLoRALinear) for n in NAMES[family])
    assert torch.equal(logits(model, inputs), want)


# --------------------------------------------------------------------------------------------- bf16

@pytest.mark.parametrize("fp32_adapter, dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_bf16_model_gets_fp32_adapters_unless_asked_not_to(fp32_adapter, dtype):
    model = tiny("llama").to(torch.bfloat16).train()
    lora.add_lora(model, TARGETS["llama"], r=4, fp32_adapter=fp32_adapter)
    adapters = [p for p in model.parameters() if p.requires_grad]
    assert adapters and all(p.dtype == dtype for p in adapters)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    out = model(**batch("llama"))
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    grads = [m.lora_B.weight.grad for m in lora.lora_layers(model)]     # B's gradient at B = 0
    assert all(g is not None and g.dtype == dtype and g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------ Align-LoRA, MT-CRL on HF models

@pytest.mark.parametrize("family", TARGETS)
@pytest.mark.parametrize("kind", align_lora.KINDS)
def test_alignment_loss_takes_the_hf_attention_mask(family, kind):
    model = tiny(family)
    lora.add_lora(model, TARGETS[family], r=4)
    align = align_lora.AlignmentLoss(model, n_tasks=T, kind=kind)
    assert len(align.names) == len(NAMES[family])
    inputs = batch(family)
    mask = inputs["attention_mask"]
    assert mask.dtype == torch.int64 and (mask == 0).any()
    model(**inputs)
    loss = align(TASK, mask)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert all(m.lora_A.weight.grad.abs().sum() > 0 for m in lora.lora_layers(model))
    with torch.no_grad():                     # other tokens at the padding: the loss is the same
        model(**(inputs | dict(input_ids=inputs["input_ids"].masked_fill(mask == 0, 7))))
        torch.testing.assert_close(align(TASK, mask), loss.detach())
        model(**inputs)
        assert not torch.allclose(align(TASK), loss.detach())      # without the mask: it counts


def test_mtcrl_on_bert_last_hidden_state_with_its_attention_mask():
    model = tiny("bert").train()
    lora.add_lora(model, TARGETS["bert"], r=4)
    inputs, env = batch("bert"), torch.tensor([0, -1, 1, -1])
    mask = inputs["attention_mask"]
    h = model.bert(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
    crl, head = spurious_reg.MTCRL(d=32, n_tasks=T, n_modules=4), nn.Linear(32, 3, bias=False)
    gated = crl(h, TASK)
    assert gated.shape == h.shape and torch.equal(gated, 0.5 * h)     # every gate 0.5 at init
    dec = crl.decorrelation(h, mask)
    torch.testing.assert_close(dec, crl.decorrelation(h[mask.bool()]))   # padding left out
    risk = nn.functional.cross_entropy(head(gated[:, 0]), inputs["labels"], reduction="none")
    inv = crl.invariance(risk, TASK, env)
    loss = risk.mean() + 0.01 * dec + 0.01 * crl.sparsity() + inv
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(inv)
    assert crl.G.grad.abs().sum() > 0
    assert all(m.lora_B.weight.grad.abs().sum() > 0 for m in lora.lora_layers(model))


# ------------------------------------------------------------------------------- lora.py vs peft

@pytest.mark.parametrize("family", TARGETS)
def test_lora_matches_peft_outputs_params_training_and_merge(family):
    peft = pytest.importorskip("peft")
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)   # BERT's
    base = tiny(family, **(no_dropout if family == "bert" else {}))   # no random masks to match
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS[family], lora_dropout=0.0))
    ours = copy.deepcopy(base)
    assert lora.add_lora(ours, TARGETS[family], r=4, alpha=8) == NAMES[family]
    with torch.no_grad():
        peft_state = dict(theirs.named_parameters())
        for name in NAMES[family]:
            layer = ours.get_submodule(name)
            for ab in ("lora_A", "lora_B"):
                p = peft_state[f"base_model.model.{name}.{ab}.default.weight"]
                if ab == "lora_B":
                    p.normal_(std=0.2)                 # non-zero B: the update acts
                getattr(layer, ab).weight.copy_(p)
    inputs = batch(family)
    out_diff = (logits(ours, inputs) - logits(theirs, inputs)).abs().max().item()
    assert not torch.allclose(logits(ours, inputs), logits(base, inputs), atol=1e-3)
    assert out_diff < 1e-5

    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert count(ours) == count(theirs) == 4 * sum(
        m.in_features + m.out_features for m in (base.get_submodule(n) for n in NAMES[family]))

    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
            for m in (ours, theirs)]
    losses = [[], []]
    for step in range(5):
        inputs = batch(family, seed=step + 1)
        for model, opt, out in zip((ours, theirs), opts, losses):
            model.train()
            loss = model(**inputs).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
    loss_diff = max(abs(a - b) for a, b in zip(*losses))
    assert losses[0][-1] != losses[0][0] and loss_diff < 1e-5

    merged_ours = lora.merge_and_unload_lora(ours).state_dict()
    merged_theirs = theirs.merge_and_unload().state_dict()
    assert merged_ours.keys() == merged_theirs.keys()
    weight_diff = max((merged_ours[k] - merged_theirs[k]).abs().max().item() for k in merged_ours)
    assert weight_diff < 1e-6
    print(f"\npeft parity on {family}: max output diff {out_diff:.2e}, max loss diff over 5 steps "
          f"{loss_diff:.2e}, max merged-weight diff {weight_diff:.2e}")
