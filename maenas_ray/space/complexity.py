"""Model complexity: multiply-adds at a given input size."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

#: The operators counted: convolutions and the matrix products of linear layers.
_COUNTED = ("convolution", "addmm", "mm", "bmm")


def count_macs(model: nn.Module, input_size: int | tuple[int, int]) -> int:
    """Multiply-adds of one forward pass of a single ``3 x H x W`` image.

    Counted over convolutions and linear layers with ``torch.utils.flop_counter``'s
    convention (2 FLOPs per multiply-add), halved; pooling, BatchNorm, activations and
    additions are not counted. The model runs in eval mode, so an auxiliary head (a
    training-time branch) is not counted either.
    """
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, h, w, device=device))
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts().get("Global", {})
    flops = sum(n for op, n in counts.items() if str(op).split(".")[1] in _COUNTED)
    return int(flops) // 2
