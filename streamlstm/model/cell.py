"""One LSTM timestep written out gate by gate, over nn.LSTM's own weights.

Pure tensor math: it knows nothing of keys, state tables or Kafka. Gate order and bias layout follow
nn.LSTM (input, forget, cell, output; b_ih + b_hh), so the same trained weights serve both paths.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn


class LayerWeights(NamedTuple):
    w_ih: torch.Tensor  # [4H, in]
    w_hh: torch.Tensor  # [4H, H]
    bias: torch.Tensor  # [4H], b_ih + b_hh folded once


def layer_weights(lstm: nn.LSTM) -> list[LayerWeights]:
    """Per-layer weights of an nn.LSTM, detached, biases summed so each step adds one vector."""
    return [
        LayerWeights(
            getattr(lstm, f"weight_ih_l{k}").detach(),
            getattr(lstm, f"weight_hh_l{k}").detach(),
            (getattr(lstm, f"bias_ih_l{k}") + getattr(lstm, f"bias_hh_l{k}")).detach(),
        )
        for k in range(lstm.num_layers)
    ]


def tanh(x: torch.Tensor) -> torch.Tensor:
    """On the CPU, NumPy's tanh: torch 2.13's (Sleef, 1 ULP) takes ~2.8 ns an element on an AVX-512 core,
    NumPy's (SIMD, a few ULP) ~0.4, and the step's two tanh were a third of a CPU step. Against nn.LSTM
    over 3 000 steps the error stays where the matmul order puts it (~1e-7; tests/test_step.py)."""
    if x.device.type != "cpu":
        return torch.tanh(x)
    return torch.from_numpy(np.tanh(x.numpy()))


def lstm_step(
    x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, layers: list[LayerWeights]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance a batch one timestep.

    x: [B, in]; h, c: [layers, B, H]. Returns the new (h, c), same shapes; the top layer's h is the
    step's output.
    """
    new_h, new_c = [], []
    inp = x
    for k, w in enumerate(layers):
        gates = torch.addmm(w.bias, inp, w.w_ih.t())
        gates.addmm_(h[k], w.w_hh.t())
        i, f, g, o = gates.chunk(4, dim=1)
        c_k = torch.sigmoid(f) * c[k] + torch.sigmoid(i) * tanh(g)
        h_k = torch.sigmoid(o) * tanh(c_k)
        new_h.append(h_k)
        new_c.append(c_k)
        inp = h_k
    return torch.stack(new_h), torch.stack(new_c)
