"""What the method-file tests share (the method files share nothing): the small model they adapt
(also with quantized layers), a counter of host reads of tensor values, and a runner of a method
file's docstring example."""
import contextlib
import os
import sys
import textwrap

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the method files, train.py


class Tiny(nn.Module):
    """Two blocks with linear layers named like train.py's, plus a layer that is not a target."""

    def __init__(self, d=12):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(q=nn.Linear(d, d), up=nn.Linear(d, 3 * d),
                                                       down=nn.Linear(3 * d, d))) for _ in range(2))
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        for b in self.blocks:
            x = x + b["down"](torch.relu(b["up"](b["q"](x))))
        return self.head(x)


class Int8Linear(nn.Linear):
    """A stand-in for a quantized layer (bitsandbytes' Linear8bitLt or Linear4bit, which
    tests/test_quantized.py uses): an nn.Linear whose weight is int8, a scale per output row."""

    def __init__(self, layer):
        super().__init__(layer.in_features, layer.out_features, device="meta")
        scale = layer.weight.detach().abs().amax(1, keepdim=True) / 127
        W = (layer.weight / scale).round().to(torch.int8)
        self.weight = nn.Parameter(W, requires_grad=False)
        self.bias = layer.bias
        self.register_buffer("scale", scale)

    def forward(self, x):
        return nn.functional.linear(x, self.weight * self.scale, self.bias)


def quantized_tiny(targets=("down",)):
    """Tiny with its `targets` layers quantized (Int8Linear); the others stay float."""
    model = Tiny()
    for b in model.blocks:
        for t in targets:
            b[t] = Int8Linear(b[t])
    return model


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


def count_host_reads(monkeypatch, anywhere=False):
    """From now until monkeypatch undoes it, record every .item() / .tolist() / bool() / int() /
    float() / index use of a tensor (each a host-device sync on a GPU) made by the project's own
    code: a file at the repository's top level (the method files, train.py), not torch's (even in
    ./.venv) nor the tests'. anywhere=True records reads made by any Python code, torch's
    included (strict; a training step's optimizer reads its step counts). Returns the record, a
    list of "file:line name" strings: `assert reads == []` names each read; len(reads) counts."""
    reads = []
    for name in HOST_READS:
        def counted(self, *args, _real=getattr(torch.Tensor, name), _name=name, **kw):
            caller = sys._getframe(1)
            where = os.path.abspath(caller.f_code.co_filename)
            if anywhere or os.path.dirname(where) == ROOT:
                reads.append(f"{os.path.basename(where)}:{caller.f_lineno} {_name}")
            return _real(self, *args, **kw)
        monkeypatch.setattr(torch.Tensor, name, counted)
    # the counting works: a read of the tests' own is left out (unless anywhere), and the six
    # reads made from a (pretend) top-level file are all recorded
    torch.tensor(0).item()
    probe = "t.item(), t.tolist(), bool(t), int(t), float(t), [0][t]"
    exec(compile(probe, os.path.join(ROOT, "host_read_probe.py"), "exec"), {"t": torch.tensor(0)})
    own = ["item"] if anywhere else []                     # the tests' own read, above
    assert [r.split()[-1] for r in reads] == own + list(HOST_READS), reads
    reads.clear()
    return reads


def run_docstring_example(module, tmp_path):
    """Run the usage example of `module`'s docstring as written: the indented block after the line
    ending in "(no edits to its code):" or the line "Usage ...:", dedented, in tmp_path (examples
    may save files). Returns the names the example defined."""
    lines = module.__doc__.splitlines()
    start = next((i for i, line in enumerate(lines) if line.endswith("(no edits to its code):")
                  or (line.startswith("Usage") and line.endswith(":"))), None)
    assert start is not None, f"{module.__name__}'s docstring has no 'Usage ...:' line"
    block = []
    for line in lines[start + 1:]:
        if line.strip() and not line.startswith(" "):     # the block ends at unindented text
            break
        block.append(line)
    code = textwrap.dedent("\n".join(block)).strip()
    assert code, f"{module.__name__}'s docstring has no indented example after its 'Usage' line"
    names = {"__name__": f"{module.__name__}_docstring_example"}
    with contextlib.chdir(tmp_path):
        exec(compile(code, f"{module.__name__} docstring example", "exec"), names)
    return names
