"""Each adapter file on a model it was not written for: a stock nn.TransformerEncoder."""
import copy

import pytest
import torch
import torch.nn as nn

import lora
import mtl_lora
import multihead_lora as mh

T = 3   # tasks, for MTL-LoRA


def encoder(seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0,
                                       batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2)      # enable_nested_tensor=True, the default


ADAPT = {   # name -> (adapt the model, merge, unmerge)
    "lora": (lambda m, t: lora.add_lora(m, t, r=4), lora.merge_lora, lora.unmerge_lora),
    "mlora": (lambda m, t: mh.add_multihead_lora(m, t, r=4, router=False),
              mh.merge_multihead_lora, mh.unmerge_multihead_lora),
    "hydra": (lambda m, t: mh.add_multihead_lora(m, t, r=4, router=True), None, None),
    "mtl": (lambda m, t: mtl_lora.add_mtl_lora(m, T, t, r=4, n_up=2, tau=0.5),
            lambda m: mtl_lora.merge_mtl_lora(m, 1), mtl_lora.unmerge_mtl_lora),
}


def call(model, x, ids):
    if any(isinstance(m, mtl_lora.MTLLoRALinear) for m in model.modules()):
        with mtl_lora.task_ids(model, ids):
            return model(x)
    return model(x)


@pytest.mark.parametrize("method", ADAPT)
def test_adapt_train_and_merge_a_stock_transformer_encoder(method):
    add, merge, unmerge = ADAPT[method]
    model = encoder()
    base = copy.deepcopy(model).eval()
    names = add(model, ["linear1", "linear2"])
    assert names == [f"layers.{i}.{n}" for i in range(2) for n in ("linear1", "linear2")]
    x, ids = torch.randn(6, 5, 16), torch.arange(6) % T
    target = torch.randn(6, 5, 16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for _ in range(30):
        loss = (call(model, x, ids) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    frozen = {n.replace(".base.", "."): p for n, p in model.named_parameters()
              if not p.requires_grad}
    assert frozen.keys() == dict(base.named_parameters()).keys()       # every base weight, frozen
    assert all(torch.equal(p, frozen[n]) for n, p in base.named_parameters())
    model.eval()
    with torch.no_grad():          # the encoder's inference fast path must not bypass the adapters
        got = call(model, x, ids)
        assert not torch.allclose(got, base(x), atol=1e-4)
    with torch.enable_grad():
        torch.testing.assert_close(got, call(model, x, ids).detach())
    if merge is None:              # routed heads depend on the input: no merged form
        with pytest.raises(ValueError, match="cannot be merged"):
            mh.merge_multihead_lora(model)
        return
    if method == "mtl":            # merged for task 1 serves task 1's samples
        x, ids = x[ids == 1], ids[ids == 1]
        got = call(model, x, ids)
    with torch.no_grad():
        merge(model)
        torch.testing.assert_close(model(x), got, atol=1e-5, rtol=1e-5)   # no ids needed now
        unmerge(model)
        torch.testing.assert_close(call(model, x, ids), got, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ADAPT)
def test_attention_out_proj_is_refused(method):
    """nn.MultiheadAttention reads out_proj.weight itself: an adapter there would do nothing."""
    with pytest.raises(ValueError, match="MultiheadAttention"):
        ADAPT[method][0](encoder(), ["self_attn.out_proj"])


@pytest.mark.parametrize("method", ADAPT)
def test_eval_with_a_padding_mask_uses_the_adapters(method):
    """In eval, with a src_key_padding_mask, the encoder's nested-tensor path reads linear1.weight
    before any hook runs; adapted, it must take the slow path, use the adapters, and give each
    sample's real tokens what the sample alone (no padding, no mask) gives."""
    model = encoder()
    ADAPT[method][0](model, ["linear1", "linear2"])
    for m in model.modules():
        if hasattr(m, "lora_B"):
            (m.lora_B.weight if isinstance(m.lora_B, nn.Linear) else m.lora_B).data.normal_()
    model.eval()
    base = encoder().eval()
    x, ids = torch.randn(3, 5, 16), torch.tensor([0, 2, 1])
    lengths = [5, 3, 2]
    pad = torch.arange(5)[None] >= torch.tensor(lengths)[:, None]          # (3, 5) True = padding
    with torch.no_grad():
        if method == "mtl":
            with mtl_lora.task_ids(model, ids):
                out = model(x, src_key_padding_mask=pad)
        else:
            out = model(x, src_key_padding_mask=pad)
        for b, n in enumerate(lengths):
            alone = call(model, x[b:b + 1, :n], ids[b:b + 1])
            torch.testing.assert_close(out[b, :n], alone[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[0], base(x[:1])[0], atol=1e-3)      # the adapters act
