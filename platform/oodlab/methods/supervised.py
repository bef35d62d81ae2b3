"""``supervised``: plain cross-entropy training, the baseline every post-hoc score starts from."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from oodlab.methods.base import Method, MethodParams, TrainState
from oodlab.registry import METHODS


class SupervisedParams(MethodParams):
    name: Literal["supervised"] = "supervised"


@METHODS.register
class Supervised(Method):
    """Minimise the mean cross-entropy of the ID mini-batch."""

    name = "supervised"
    Params = SupervisedParams

    def training_step(self, model: nn.Module, batch: tuple[Tensor, Tensor],
                      oe_batch: tuple[Tensor, Tensor] | None, state: TrainState) -> Tensor:
        x, y = batch
        return F.cross_entropy(model(x)[0], y)
