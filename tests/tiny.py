"""The small model the method-file tests adapt (shared by them; the method files share nothing)."""
import torch
import torch.nn as nn


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
