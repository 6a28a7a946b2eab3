"""FLOPs a training step really runs, per token, for FLOP/s and MFU.

Forward runs through every weight. Backward computes input gradients only from the top of the model down to the
lowest parameter that trains (below it nothing needs a gradient, so autograd stops), and weight gradients only
for the parameters that train. With F the forward FLOPs per token (2 per weight plus attention's products), N all
weights, N_t the trainable ones and s the share of weights at or above the lowest trainable one:

    step FLOPs per token = F + s * F + 2 * N_t

which is the familiar 6N (+ 12·L·C·T attention) when everything trains, and far less when only an upper block
trains (BAdam) or only adapters do.
"""

from __future__ import annotations

import torch.nn as nn

from slimtune.memory import param_numel


def step_flops_per_token(model: nn.Module, forward_flops_per_token: float) -> float:
    params = list(model.parameters())  # registration order: input to output for the models slimtune trains
    total = sum(param_numel(p) for p in params)
    if total == 0:
        return forward_flops_per_token
    first = next((i for i, p in enumerate(params) if p.requires_grad), None)
    if first is None:
        return forward_flops_per_token
    above = sum(param_numel(p) for p in params[first:]) / total
    trainable = sum(param_numel(p) for p in params if p.requires_grad)
    return forward_flops_per_token * (1 + above) + 2 * trainable
