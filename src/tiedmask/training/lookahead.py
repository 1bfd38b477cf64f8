"""Lookahead weight averaging (Zhang et al. 2019; the fast CIFAR-10 records use it): a slow
copy of the weights trails the trained ("fast") ones, and every `every` steps it moves part
of the way to them and the fast weights restart from it:

    slow <- slow + (1 - decay) * (fast - slow);   fast <- slow

BatchNorm running statistics are averaged alike. The optimizer's momentum is left alone.
Each epoch starts with `restart` (slow <- fast) and ends with `sync`, so a checkpoint of the
model holds the whole state and a resumed run continues bitwise, whatever happens to the
weights between epochs (data-parallel runs average their BatchNorm statistics there).

>>> import torch
>>> net = torch.nn.Linear(1, 1, bias=False)
>>> _ = torch.nn.init.constant_(net.weight, 0.0)
>>> avg = Lookahead(net, every=1, decay=0.75)
>>> with torch.no_grad():
...     _ = net.weight.fill_(1.0)  # a training step moved the weight from 0 to 1
>>> avg.after_step(1)
>>> net.weight.item()  # a quarter of the way
0.25
"""

from __future__ import annotations

import torch
from torch import nn


class Lookahead:
    def __init__(self, model: nn.Module, every: int, decay: float):
        self.every, self.decay = every, decay
        # The floating state: parameters and persistent buffers (running statistics), which
        # state_dict returns as views of the model's own storage.
        self.fast = [t for t in model.state_dict().values() if t.is_floating_point()]
        self.slow = [t.detach().clone() for t in self.fast]

    @torch.no_grad()
    def restart(self) -> None:
        """Start the slow weights from the model's weights as they are now."""
        for fast, slow in zip(self.fast, self.slow):
            slow.copy_(fast)

    def after_step(self, step: int) -> None:
        """Call after optimizer step number `step` (from 1)."""
        if step % self.every == 0:
            self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        for fast, slow in zip(self.fast, self.slow):
            slow.lerp_(fast, 1 - self.decay)
            fast.copy_(slow)
