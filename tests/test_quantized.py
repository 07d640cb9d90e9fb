"""The method files on a quantized model (QLoRA): a tiny LLaMA built from a config (no download),
saved and loaded back in 4-bit (nf4) and 8-bit by transformers with bitsandbytes on the CPU. Each
file adapts the quantized layers without importing bitsandbytes: fp32 adapters, the start equal to
the quantized base, training, adapter-only save and load, save_pretrained and Trainer checkpoints,
merging refused with the way out (dequantize, then merge and unload) tested; lora.py against peft.

A pitfall these tests step around: on a CPU, bitsandbytes repacks a 4-bit weight at its first
forward in eval mode on an input without gradient (e.g. under torch.no_grad), after which no
gradient flows through that layer. So every reference here is computed in train mode."""
import contextlib
import importlib

import pytest
import torch

import align_lora
import lora
import mtl_lora
import multihead_lora as mh
import spurious_reg

try:
    importlib.import_module("bitsandbytes")       # it loads here (no method file imports it)
    import transformers
    from safetensors.torch import load_file
except Exception as e:                  # not installed, or a build that cannot load here
    pytest.skip(f"needs bitsandbytes and transformers (pip install -r tests/requirements.txt): "
                f"{type(e).__name__}: {e}", allow_module_level=True)

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),    # bitsandbytes' casting notes
              pytest.mark.usefixtures("one_thread")]
KINDS = ("4bit", "8bit")
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
NAMES = [f"model.layers.{i}.{n}" for i in range(2)
         for n in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")]
TASK = torch.tensor([0, 1, 0, 1])
ADAPT = {   # method -> (adapt, adapter tensors only, load them, merge and unload)
    "lora": (lambda m: lora.add_lora(m, TARGETS, r=4), lora.lora_state_dict,
             lora.load_lora_state_dict, lora.merge_and_unload_lora),
    "hydra": (lambda m: mh.add_multihead_lora(m, TARGETS, r=4),
              mh.multihead_state_dict, mh.load_multihead_state_dict,
              mh.merge_and_unload_multihead_lora),
    "mlora": (lambda m: mh.add_multihead_lora(m, TARGETS, r=4, router=False),
              mh.multihead_state_dict, mh.load_multihead_state_dict,
              mh.merge_and_unload_multihead_lora),
    "mtl": (lambda m: mtl_lora.add_mtl_lora(m, 2, TARGETS, r=4, n_up=2, tau=0.5),
            mtl_lora.mtl_state_dict, mtl_lora.load_mtl_state_dict,
            lambda m: mtl_lora.merge_and_unload_mtl_lora(m, 1)),
}
REFUSAL = r"cannot merge into a quantized weight \(Linear(4bit|8bitLt), torch\.u?int8\): " \
          r"dequantize the model first \(transformers: model = model\.dequantize\(" \
          r"dtype=torch\.float32\)\), then " \
          r"merge_and_unload_\w+\(model\)"



@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random-init LLaMA, saved once; the tests load it back quantized (hidden 64: in eval
    mode, bitsandbytes' CPU 4-bit kernel needs 64 inputs or more, outputs in multiples of 32)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=128, max_position_embeddings=64)
    ).save_pretrained(path)
    return path


def load(path, kind, **config):
    """The saved model loaded in 4-bit or 8-bit, in train mode (see the module's docstring)."""
    q = transformers.BitsAndBytesConfig(**{f"load_in_{kind}": True}, **config)
    try:
        model = transformers.LlamaForCausalLM.from_pretrained(path, quantization_config=q,
                                                              device_map="cpu")
    except ImportError as e:                                  # anything else is a failure
        pytest.skip(f"bitsandbytes cannot load a {kind} model here: {e}")
    return model.train()


def batch(seed=0):
    ids = torch.randint(1, 99, (4, 6), generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, labels=ids)


def tasks(model, task=TASK):
    """MTL-LoRA's layers need the task ids; the other methods' layers need nothing."""
    if mtl_lora.mtl_layers(model):
        return mtl_lora.task_ids(model, task)
    return contextlib.nullcontext()


@torch.no_grad()
def logits(model, task=TASK):
    with tasks(model, task):
        return model(input_ids=batch()["input_ids"]).logits


def adapters(model):
    return [p for p in model.parameters() if p.requires_grad]


def train(model, steps, extra=lambda out: 0.0, params=()):
    """AdamW steps on one batch; the losses, and the adapters that got no gradient at the last."""
    opt = torch.optim.AdamW(adapters(model) + list(params), lr=1e-2)
    losses = []
    for _ in range(steps):
        with tasks(model):
            out = model(**batch())
            loss = out.loss + extra(out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, [p.shape for p in adapters(model) if p.grad is None or not p.grad.any()]


def quantized_weights(model):
    return {n: m.base.weight.dtype for n, m in model.named_modules() if hasattr(m, "lora_A")}


# ------------------------------------------------------------------------------------ each method

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ADAPT)
def test_each_file_adapts_trains_saves_and_refuses_to_merge_a_quantized_model(saved, kind, method):
    add, state, load_state, unload = ADAPT[method]
    model = load(saved, kind)
    want = logits(model)
    assert add(model) == NAMES                                 # it crashed here (issue 24)
    dtype = torch.uint8 if kind == "4bit" else torch.int8
    assert set(quantized_weights(model).values()) == {dtype}   # the base stays quantized
    assert {p.dtype for p in adapters(model)} == {torch.float32}
    assert torch.equal(logits(model), want)                    # the start is the quantized base

    losses, no_grad = train(model, 4)
    assert losses[-1] < losses[0] - 0.1 and no_grad == []     # every adapter tensor learns

    saved_state, trained = state(model), logits(model)
    assert all(v.dtype == torch.float32 for v in saved_state.values())
    fresh = load(saved, kind)
    add(fresh)
    load_state(fresh, saved_state)
    assert torch.equal(logits(fresh), trained)

    refusal = "routed" if method == "hydra" else REFUSAL
    with pytest.raises(ValueError, match=refusal):
        unload(model)
    assert list(quantized_weights(model)) == NAMES and torch.equal(logits(model), trained)


@pytest.mark.parametrize("kind", KINDS)
def test_alignment_loss_and_mtcrl_train_on_a_quantized_model(saved, kind):
    model = load(saved, kind)
    lora.add_lora(model, TARGETS, r=4)
    align = align_lora.AlignmentLoss(model, n_tasks=2)
    losses, no_grad = train(model, 4, lambda out: 0.2 * align(TASK))
    assert losses[-1] < losses[0] and no_grad == []
    crl, ids = spurious_reg.MTCRL(d=64, n_tasks=2), batch()["input_ids"]
    h = model.model(input_ids=ids).last_hidden_state          # MT-CRL's gates before the head
    out = model.lm_head(crl(h, TASK))[:, :-1].transpose(1, 2)
    risk = torch.nn.functional.cross_entropy(out, ids[:, 1:], reduction="none").mean(-1)
    (risk.mean() + crl.invariance(risk, TASK, torch.tensor([0, -1, 1, -1]))).backward()
    assert crl.G.grad.abs().sum() > 0
    assert all(m.lora_B.weight.grad.abs().sum() > 0 for m in lora.lora_layers(model))


def test_fp32_adapter_false_takes_the_4bit_compute_dtype(saved):
    """fp32 adapters by default (as peft); fp32_adapter=False: the layer's compute dtype."""
    for fp32, dtype in [(True, torch.float32), (False, torch.bfloat16)]:
        model = load(saved, "4bit", bnb_4bit_compute_dtype=torch.bfloat16)
        lora.add_lora(model, TARGETS, r=4, fp32_adapter=fp32)
        assert {p.dtype for p in adapters(model)} == {dtype}
        model(**batch()).loss.backward()
        assert all(m.lora_B.weight.grad.abs().sum() > 0 for m in lora.lora_layers(model))


# --------------------------------------------------------------------------- the way out of merging

@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_then_merge_and_unload_gives_a_plain_model(saved, kind, tmp_path):
    """The refusal's way out: transformers' dequantize() puts float nn.Linear layers inside the
    adapters, then merge_and_unload_lora leaves a plain LLaMA that computes the adapted quantized
    model's outputs within the quantization error."""
    model = load(saved, kind)
    base = logits(model)
    lora.add_lora(model, TARGETS, r=4)
    with torch.no_grad():
        for p in adapters(model):
            p.add_(0.2 * torch.randn_like(p))
    want = logits(model)
    assert (want - base).abs().max() > 0.1                    # the adapters act
    model = lora.merge_and_unload_lora(model.dequantize())
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in NAMES)
    got = logits(model)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    model.save_pretrained(tmp_path)
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path).train()
    assert torch.equal(logits(plain), got)


# ----------------------------------------------------------------- save_pretrained and the Trainer

@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_of_the_quantized_model_holds_the_adapter(saved, kind, tmp_path):
    model = load(saved, kind)
    lora.add_lora(model, TARGETS, r=4)
    train(model, 2)
    model.save_pretrained(tmp_path)
    file = load_file(tmp_path / "model.safetensors")
    adapter = lora.lora_state_dict(model)
    assert all(torch.equal(file[k], v) for k, v in adapter.items())
    fresh = load(saved, kind)
    lora.add_lora(fresh, TARGETS, r=4)
    lora.load_lora_state_dict(fresh, {k: v for k, v in file.items() if k in adapter})
    assert torch.equal(logits(fresh), logits(model))


class TaskTrainer(transformers.Trainer):
    """The QLoRA recipe's Trainer: the batch's "task" column goes to MTL-LoRA's layers around the
    whole training step (under gradient checkpointing the backward runs the layers again), and
    the alignment loss is added to the task loss."""

    def __init__(self, *args, align, **kwargs):
        super().__init__(*args, **kwargs)
        self.align, self.task = align, None

    def training_step(self, model, inputs, *args, **kwargs):
        self.task = inputs.pop("task")
        with mtl_lora.task_ids(model, self.task):
            return super().training_step(model, inputs, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        out = model(**inputs)
        loss = out.loss + 0.2 * self.align(self.task, inputs["attention_mask"])
        return (loss, out) if return_outputs else loss


def test_qlora_recipe_prepare_then_adapt_then_trainer_with_task_ids_and_alignment(saved, tmp_path):
    """peft's prepare_model_for_kbit_training (fp32 norms, gradient checkpointing) before
    add_mtl_lora, then transformers' Trainer with task ids and Align-LoRA's loss: every adapter
    tensor trains and the checkpoint holds them. Reentrant checkpointing (its default) runs the
    forward without autograd: the alignment loss refuses it with the way out."""
    peft = pytest.importorskip("peft")
    model = peft.prepare_model_for_kbit_training(load(saved, "4bit"))
    mtl_lora.add_mtl_lora(model, 2, TARGETS, r=4)
    with align_lora.AlignmentLoss(model, n_tasks=2) as align, mtl_lora.task_ids(model, TASK):
        model(**batch())
        with pytest.raises(ValueError, match="use_reentrant=False"):
            align(TASK)

    model = peft.prepare_model_for_kbit_training(
        load(saved, "4bit"), gradient_checkpointing_kwargs={"use_reentrant": False})
    mtl_lora.add_mtl_lora(model, 2, TARGETS, r=4)
    align = align_lora.AlignmentLoss(model, n_tasks=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = [dict(input_ids=x, labels=x, attention_mask=torch.ones_like(x), task=i % 2)
            for i, x in enumerate(torch.randint(1, 99, (8, 6)))]
    args = transformers.TrainingArguments(
        str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        save_strategy="steps", save_steps=2, logging_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, remove_unused_columns=False, seed=0)
    with pytest.raises(ValueError, match="purely quantized"):   # transformers knows peft's only
        TaskTrainer(model=model, args=args, train_dataset=data, align=align)
    model.is_quantized = False                                  # the flag it checks, while it is
    trainer = TaskTrainer(model=model, args=args, train_dataset=data, align=align)   # built
    model.is_quantized = True
    trainer.train()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters()
               if p.requires_grad)
    checkpoint = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert all(torch.equal(checkpoint[k], v) for k, v in mtl_lora.mtl_state_dict(model).items())
    want = logits(model, torch.ones(4, dtype=torch.long))      # served for task 1 by a plain model
    align.remove()                                             # (after a save, name the dtype)
    model = mtl_lora.merge_and_unload_mtl_lora(model.dequantize(dtype=torch.float32), 1)
    assert not mtl_lora.mtl_layers(model)
    torch.testing.assert_close(logits(model), want, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------- lora.py vs peft

def test_lora_matches_peft_on_a_4bit_model(saved):
    peft = pytest.importorskip("peft")
    ours = load(saved, "4bit")
    theirs = peft.get_peft_model(load(saved, "4bit"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    assert lora.add_lora(ours, TARGETS, r=4, alpha=8) == NAMES
    with torch.no_grad():
        state = dict(theirs.named_parameters())
        for name in NAMES:
            for ab in ("lora_A", "lora_B"):
                p = state[f"base_model.model.{name}.{ab}.default.weight"]
                if ab == "lora_B":
                    p.normal_(std=0.2)                           # non-zero B: the update acts
                getattr(ours.get_submodule(name), ab).weight.copy_(p)
    losses = [train(m, 5)[0] for m in (ours, theirs)]
    diff = max(abs(a - b) for a, b in zip(*losses))
    assert losses[0][-1] < losses[0][0] and diff < 1e-5
    print(f"\npeft parity on a 4-bit LLaMA: max loss difference over 5 steps {diff:.2e}")
