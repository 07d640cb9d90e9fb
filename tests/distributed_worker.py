"""The method files under a user's engine: run by tests/test_distributed.py as
`torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py OUT` (gloo, CPU).

Every case (a method file on a tiny model) trains under DDP and under FSDP2 (fully_shard), each
process on its half of the same global batches. Each process writes OUT/results<rank>.pt: per
case and engine, the loss of each step (the mean of the processes', as a user reports it), the
adapter as process 0 saves it from the trained model (FSDP2: from the full state dict), and the
trained model's logits on a probe batch; and what a few slips of a user's give (errors as text).
The test compares them with one process trained by the same functions (imported from here)."""
import contextlib
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the method files
import align_lora                                                                  # noqa: E402
import lora                                                                        # noqa: E402
import mtl_lora                                                                    # noqa: E402
import multihead_lora as mh                                                        # noqa: E402
import spurious_reg                                                                # noqa: E402

D, L, C, T, B = 16, 6, 5, 3, 8         # width, tokens, classes, tasks, global batch (2 halves of 4)
STEPS, LR = 6, 0.5                     # plain SGD: the update is the gradient, scale included
ALIGN, DEC, SP, IRM = 0.2, 0.1, 0.1, 1.0     # weights of L_align and of MT-CRL's regularizers
IDS = torch.tensor([0, 1, 0, 1, 1, 2, 2, 1])     # tasks: each half holds 2 tasks, 2 samples each
ENVS = torch.tensor([0, 1, 1, 0, 0, -1, 1, 1])   # MT-CRL's environments (-1: none)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.up, self.down = nn.Linear(D, D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.q(x))))


class Net(nn.Module):
    """Two blocks, a LayerNorm and a bias-free head; MT-CRL's gates (crl) before the head."""

    def __init__(self, crl=False):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, C, bias=False)
        self.crl = spurious_reg.MTCRL(D, T, n_modules=4, n_envs=2) if crl else None

    def forward(self, x, ids):                              # x (B, L, D), ids (B,)
        for b in self.blocks:
            x = b(x)
        h = self.norm(x)                                    # the representation, (B, L, D)
        return self.head(h if self.crl is None else self.crl(h, ids)), h


ADD = {   # case -> adapt the model in place; the adapters' state dict; load it
    "lora": (lambda m: lora.add_lora(m, ["q", "up"], r=4),
             lora.lora_state_dict, lora.load_lora_state_dict),
    "hydra": (lambda m: mh.add_multihead_lora(m, ["q", "up"], r=4, n_heads=3),
              mh.multihead_state_dict, mh.load_multihead_state_dict),
    "mlora": (lambda m: mh.add_multihead_lora(m, ["q", "up"], r=4, router=False, init="offset"),
              mh.multihead_state_dict, mh.load_multihead_state_dict),
    "mtl": (lambda m: mtl_lora.add_mtl_lora(m, T, ["q", "up"], r=4, n_up=2, tau=0.5),
            mtl_lora.mtl_state_dict, mtl_lora.load_mtl_state_dict),
    "align": (lambda m: lora.add_lora(m, ["q", "up", "down"], r=4),
              lora.lora_state_dict, lora.load_lora_state_dict),
    "mtcrl": (lambda m: lora.add_lora(m, ["q"], r=4),
              lora.lora_state_dict, lora.load_lora_state_dict),
}
CASES = list(ADD)


def build(case):
    """The same model in every process: the seed fixes the base and the adapters' init."""
    torch.manual_seed(0)
    model = Net(crl=case == "mtcrl")
    ADD[case][0](model)                                     # freezes the rest, crl.G too
    if model.crl is not None:
        model.crl.G.requires_grad_(True)
    align = align_lora.AlignmentLoss(model, T) if case == "align" else None
    return model, align


def adapter_state(case, model):
    """What a user saves: the file's adapter tensors (and MT-CRL's graph logits)."""
    state = ADD[case][1](model)
    if model.crl is not None:
        state["crl.G"] = model.crl.G.detach().clone()
    return state


def load_adapter(case, model, state):
    state = dict(state)
    if model.crl is not None:
        model.crl.load_state_dict({"G": state.pop("crl.G")})
    ADD[case][2](model, state)


def batch(step):
    """The global batch of a step, the same in every process: x (B, L, D), targets (B, L)."""
    g = torch.Generator().manual_seed(1000 + step)
    return dict(x=torch.randn(B, L, D, generator=g), y=torch.randint(C, (B, L), generator=g),
                ids=IDS.clone(), env=ENVS.clone())


def part(b, i, n):
    """Part i of n of a batch: the samples a process of n gets."""
    k = len(b["ids"]) // n
    return {key: v[i * k:(i + 1) * k] for key, v in b.items()}


def loss_of(case, model, fwd, b, align):
    """The loss of one batch: cross-entropy (mean over tokens) plus what the method adds.
    fwd is the model as the engine wraps it (or the model itself)."""
    ids = b["ids"]
    ctx = mtl_lora.task_ids(model, ids) if case == "mtl" else contextlib.nullcontext()
    with ctx:                                               # MTL-LoRA: ids for this forward
        logits, h = fwd(b["x"], ids)
    per_token = F.cross_entropy(logits.flatten(0, 1), b["y"].flatten(), reduction="none")
    risks = per_token.view(len(ids), -1).mean(1)            # (B,) per-sample risks
    loss = risks.mean()
    if case == "align":                                     # statistics of this batch (process)
        loss = loss + ALIGN * align(ids)
    if case == "mtcrl":
        crl = model.crl
        loss = (loss + DEC * crl.decorrelation(h) + SP * crl.sparsity()
                + IRM * crl.invariance(risks, ids, b["env"]))
    return loss


def train(case, model, fwd, align, rank=0, world=1, halves=1, steps=STEPS):
    """STEPS of plain SGD on the trainable parameters; each process takes its part of every
    global batch. halves > 1 (one process): the loss is the mean of the losses of `halves`
    parts, each computed alone, which is what `halves` processes compute. Returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    model.train()
    losses = []
    for step in range(steps):
        b = part(batch(step), rank, world)
        loss = sum(loss_of(case, model, fwd, part(b, i, halves), align)
                   for i in range(halves)) / halves
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def probe():
    g = torch.Generator().manual_seed(7)
    return torch.randn(5, L, D, generator=g), torch.tensor([2, 0, 1, 1, 0])


@torch.no_grad()
def outputs(case, model, fwd):
    """The model's logits on the probe batch (every process runs the whole probe)."""
    x, ids = probe()
    model.eval()
    ctx = mtl_lora.task_ids(model, ids) if case == "mtl" else contextlib.nullcontext()
    with ctx:
        return fwd(x, ids)[0]


def fsdp2():
    """fully_shard and the full-state-dict reader, or None where this torch lacks FSDP2."""
    try:
        from torch.distributed.fsdp import fully_shard                 # torch >= 2.6
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard  # torch 2.4, 2.5
        except ImportError:
            return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return fully_shard, get_model_state_dict, StateDictOptions


def wrap(model, engine, mesh, shard_root=False):
    """The model as the engine runs it. DDP: the whole model. FSDP2: a unit per block, then the
    root; with MT-CRL the blocks only, unless shard_root (its invariance penalty differentiates
    through the head and G twice, and FSDP2's backward hooks, which also fire inside that
    torch.autograd.grad, reshard what it needs), and G's gradient averaged by hand."""
    if engine == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    fully_shard = fsdp2()[0]
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    if model.crl is None or shard_root:
        fully_shard(model, mesh=mesh)
    else:
        world = torch.distributed.get_world_size()

        def average(G):                                     # after backward, not autograd.grad
            torch.distributed.all_reduce(G.grad)
            G.grad /= world
        model.crl.G.register_post_accumulate_grad_hook(average)
    return model


def full_adapter_state(case, model, engine):
    """The adapter as process 0 saves it; every process calls this (FSDP2 gathers)."""
    if engine == "ddp":                                     # replicas: any process's own
        return adapter_state(case, model)
    _, get_model_state_dict, StateDictOptions = fsdp2()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    keys = adapter_state(case, model).keys()                # its values are shards: keys only
    return {k: full[k] for k in keys} if torch.distributed.get_rank() == 0 else {}


def error(e):
    return f"{type(e).__name__}: {e}"[:2000]


def attempt(load, model, state):
    try:
        load(model, state)
        return "loaded"
    except Exception as e:
        return error(e)


def main(out):
    import datetime
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results, engines, mesh = {}, ["ddp"], None
    if fsdp2() is None:
        results["fsdp2 unavailable"] = f"torch {torch.__version__} has no fully_shard"
    else:
        engines.append("fsdp2")
        mesh = init_device_mesh("cpu", (world,))
    for engine in engines:
        for case in CASES:
            model, align = build(case)
            try:
                fwd = wrap(model, engine, mesh)
                losses = train(case, model, fwd, align, rank, world)
                dist.all_reduce(losses)                     # the global batch's loss
                losses /= world
                state = full_adapter_state(case, model, engine)
                results[case, engine] = dict(losses=losses, adapter=state,
                                             outputs=outputs(case, model, fwd))
                if case == "lora" and engine == "fsdp2" and rank == 0:     # a user's slips:
                    # the shards that lora_state_dict gives on a sharded model, into a plain one
                    shards = lora.lora_state_dict(model)
                    results["load shards"] = attempt(lora.load_lora_state_dict, build(case)[0],
                                                     shards)
                    # the full adapter into the sharded model (load it before fully_shard)
                    results["load into shards"] = attempt(lora.load_lora_state_dict, model, state)
            except Exception as e:                          # reported per case, not fatal
                results[case, engine] = dict(error=error(e))
            dist.barrier()
    if mesh is not None:                # MT-CRL with the root sharded too (see wrap): one step
        model, _ = build("mtcrl")
        wrap(model, "fsdp2", mesh, shard_root=True)
        try:
            train("mtcrl", model, model, None, rank, world, steps=1)
            results["mtcrl root sharded"] = "trained"
        except Exception as e:
            results["mtcrl root sharded"] = error(e)
        dist.barrier()
    torch.save(results, os.path.join(out, f"results{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
