"""One LSTM timestep written out gate by gate, over nn.LSTM's own weights.

Pure tensor math: it knows nothing of keys, state tables or Kafka. Gate order and bias layout follow
nn.LSTM (input, forget, cell, output; b_ih + b_hh), so the same trained weights serve both paths.
"""

from __future__ import annotations

from typing import NamedTuple

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
        c_k = torch.sigmoid(f) * c[k] + torch.sigmoid(i) * torch.tanh(g)
        h_k = torch.sigmoid(o) * torch.tanh(c_k)
        new_h.append(h_k)
        new_c.append(c_k)
        inp = h_k
    return torch.stack(new_h), torch.stack(new_c)


# --------------------------------------------------------------------------- fused CUDA layer (Triton)
#
# The same gate equations as lstm_step as one Triton kernel per layer that also gathers the rows' h and c
# from the state table: a program computes all four gates of BLOCK_H units for BLOCK_B slots, so it reads
# weights once per BLOCK_B rows. It writes c back in place (only it reads those elements) but the new h to
# a dense buffer: other programs may still be reading the rows' old h; the caller scatters it after the
# step. The matmuls run on tensor cores as "tf32x3" (three TF32 products, about fp32 accuracy): plain
# fp32 arithmetic would make the step compute-bound, plain TF32 would leave errors of ~1e-3.

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs of torch ship without Triton; the fused kernel is CUDA-only
    triton = None

FUSED_MAX_HIDDEN = 1024
# (BLOCK_B, BLOCK_H, num_warps) by hidden size, from benchmarks/step_bench.py --sweep on an H100
FUSED_CONFIGS: dict[int, tuple[int, int, int]] = {}


class FusedWeights(NamedTuple):
    w_ih_t: torch.Tensor  # [in, 4H], transposed so the kernel reads weight tiles along contiguous rows
    w_hh_t: torch.Tensor  # [H, 4H]
    bias: torch.Tensor  # [4H]


def fused_weights(layers: list[LayerWeights]) -> list[FusedWeights]:
    return [FusedWeights(w.w_ih.t().contiguous(), w.w_hh.t().contiguous(), w.bias.contiguous()) for w in layers]


def fused_available(hidden_size: int) -> bool:
    return triton is not None and torch.cuda.is_available() and hidden_size <= FUSED_MAX_HIDDEN


def fused_config(hidden_size: int) -> tuple[int, int, int]:
    return FUSED_CONFIGS.get(hidden_size) or (64, min(32, max(16, triton.next_power_of_2(hidden_size))), 4)


def fused_layer_step(inp: torch.Tensor, rows: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w: FusedWeights,
                     out: torch.Tensor, config: tuple[int, int, int] | None = None) -> None:
    """Advance one layer for slots 0..n-1: rows[b]'s c in the table c ([capacity, H]) is replaced, its
    new h is written to out[b]; h (the table's) is only read, the caller scatters out into it afterwards.

    inp: [n, in] contiguous (x, or the layer below's out); rows: [n] int64, distinct except for padding,
    which may point at one scratch row any number of times. config: (BLOCK_B, BLOCK_H, num_warps).
    """
    n, n_in = inp.shape
    hidden = h.shape[1]
    block_b, block_h, num_warps = config or fused_config(hidden)
    _fused_layer_kernel[(triton.cdiv(n, block_b), triton.cdiv(hidden, block_h))](
        inp, rows, h, c, out, w.w_ih_t, w.w_hh_t, w.bias, n, n_in,
        HIDDEN=hidden, BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=16, num_warps=num_warps)


if triton is not None:

    @triton.jit
    def _gate_dots(acc_i, acc_f, acc_g, acc_o, a, w_ptr, k, k_mask, j, j_mask, HIDDEN: tl.constexpr):
        """acc_* += a @ W_*^T for one K tile; w_ptr is a transposed weight [K, 4H]."""
        tile = w_ptr + k[:, None] * (4 * HIDDEN) + j[None, :]
        mask = k_mask[:, None] & j_mask[None, :]
        acc_i += tl.dot(a, tl.load(tile, mask=mask, other=0.0), input_precision="tf32x3")
        acc_f += tl.dot(a, tl.load(tile + HIDDEN, mask=mask, other=0.0), input_precision="tf32x3")
        acc_g += tl.dot(a, tl.load(tile + 2 * HIDDEN, mask=mask, other=0.0), input_precision="tf32x3")
        acc_o += tl.dot(a, tl.load(tile + 3 * HIDDEN, mask=mask, other=0.0), input_precision="tf32x3")
        return acc_i, acc_f, acc_g, acc_o

    @triton.jit
    def _tanh(x):
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _fused_layer_kernel(inp_ptr, rows_ptr, h_ptr, c_ptr, out_ptr, w_ih_ptr, w_hh_ptr, bias_ptr, n, n_in,
                            HIDDEN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                            BLOCK_K: tl.constexpr):
        b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        b_mask = b < n
        rows = tl.load(rows_ptr + b, mask=b_mask, other=0)
        j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        j_mask = j < HIDDEN
        acc_i = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
        acc_f = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
        acc_g = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
        acc_o = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
        for k0 in range(0, n_in, BLOCK_K):  # the layer's input: x, or the layer below's new h
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < n_in
            a = tl.load(inp_ptr + b[:, None] * n_in + k[None, :], mask=b_mask[:, None] & k_mask[None, :], other=0.0)
            acc_i, acc_f, acc_g, acc_o = _gate_dots(acc_i, acc_f, acc_g, acc_o, a, w_ih_ptr, k, k_mask, j, j_mask,
                                                    HIDDEN)
        for k0 in range(0, HIDDEN, BLOCK_K):  # the recurrent input: the rows' previous h, gathered
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < HIDDEN
            a = tl.load(h_ptr + rows[:, None] * HIDDEN + k[None, :], mask=b_mask[:, None] & k_mask[None, :],
                        other=0.0)
            acc_i, acc_f, acc_g, acc_o = _gate_dots(acc_i, acc_f, acc_g, acc_o, a, w_hh_ptr, k, k_mask, j, j_mask,
                                                    HIDDEN)
        i = tl.sigmoid(acc_i + tl.load(bias_ptr + j, mask=j_mask, other=0.0)[None, :])
        f = tl.sigmoid(acc_f + tl.load(bias_ptr + HIDDEN + j, mask=j_mask, other=0.0)[None, :])
        g = _tanh(acc_g + tl.load(bias_ptr + 2 * HIDDEN + j, mask=j_mask, other=0.0)[None, :])
        o = tl.sigmoid(acc_o + tl.load(bias_ptr + 3 * HIDDEN + j, mask=j_mask, other=0.0)[None, :])
        cell = c_ptr + rows[:, None] * HIDDEN + j[None, :]
        mask = b_mask[:, None] & j_mask[None, :]
        c_new = f * tl.load(cell, mask=mask, other=0.0) + i * g
        tl.store(cell, c_new, mask=mask)
        tl.store(out_ptr + b[:, None] * HIDDEN + j[None, :], o * _tanh(c_new), mask=mask)
