"""An exponential moving average of a student's weights, validated and shipped in place of the raw weights.

Why: a small quantized student's validation accuracy jumps by a point or more from one evaluation to the
next, so the best of some twenty evaluations flatters whichever weights happened to land high. The average
of the last few hundred steps moves smoothly, and its best evaluation is less of a lucky draw.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import UserError


class WeightAverage(nn.Module):
    """The average ``avg <- d * avg + (1 - d) * w`` of every floating-point entry of a module's state
    (parameters, LSQ step sizes, float buffers), updated after each optimizer step. Other entries (flags,
    masks) are left alone. ``d`` is ``min(decay, (1 + n) / (10 + n))`` at the ``n``-th update, so that a
    short run is not an average of mostly its starting weights. The averages are buffers, so a checkpoint
    that holds this module carries them and a resumed run continues the same average."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise UserError(f"weight-average decay {decay}: must be in (0, 1), e.g. 0.99 (about 100 steps)")
        super().__init__()
        self.decay = decay
        state = module.state_dict()
        self.names = [k for k, v in state.items() if v.is_floating_point()]
        for i, name in enumerate(self.names):
            self.register_buffer(f"avg{i}", state[name].detach().clone())
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def averages(self) -> list[torch.Tensor]:
        return [getattr(self, f"avg{i}") for i in range(len(self.names))]

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        n = int(self.updates)
        d = min(self.decay, (1 + n) / (10 + n))
        state = module.state_dict()
        torch._foreach_lerp_(self.averages(), [state[k] for k in self.names], 1.0 - d)
        self.updates += 1

    @contextmanager
    def applied(self, module: nn.Module) -> Iterator[nn.Module]:
        """``module`` holding the averaged weights for the duration; its own weights come back after."""
        state = module.state_dict()
        own = {k: state[k].detach().clone() for k in self.names}
        module.load_state_dict(dict(zip(self.names, self.averages(), strict=True)), strict=False)
        try:
            yield module
        finally:
            module.load_state_dict(own, strict=False)
