"""The fused CUDA layer: cell.lstm_step's gate equations as one Triton kernel per layer, which also
gathers the rows' h and c from the state table. A program computes all four gates of BLOCK_H units for BLOCK_B slots as one
matmul into [BLOCK_B, 4·BLOCK_H], so it reads the weights once per BLOCK_B rows. It writes c back in
place (only it reads those elements) but the new h to a dense buffer: other programs may still be
reading the rows' old h, so the caller scatters it after the step. The matmuls run on tensor cores as
"tf32x3" (three TF32 products, about fp32 accuracy): plain fp32 arithmetic is slower still (the step is
compute-bound at these sizes), plain TF32 would leave errors of ~1e-3.

Imported only on the CUDA path (graphed_step.py): a CPU process never loads Triton.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .cell import LayerWeights

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs of torch ship without Triton; the fused kernel is CUDA-only
    triton = None

FUSED_MAX_HIDDEN = 1024
FUSED_CONFIGS: dict[int, tuple[int, int, int, int]] = {}  # overrides by hidden size (the benchmark's --sweep)


class FusedWeights(NamedTuple):
    w_ih_t: torch.Tensor  # [in, 4H], transposed so the kernel reads weight tiles along contiguous rows
    w_hh_t: torch.Tensor  # [H, 4H]
    bias: torch.Tensor  # [4H]


def fused_weights(layers: list[LayerWeights]) -> list[FusedWeights]:
    return [FusedWeights(w.w_ih.t().contiguous(), w.w_hh.t().contiguous(), w.bias.contiguous()) for w in layers]


def fused_available(hidden_size: int) -> bool:
    return triton is not None and torch.cuda.is_available() and hidden_size <= FUSED_MAX_HIDDEN


def fused_config(hidden_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_H, BLOCK_K, num_warps): the fastest of benchmarks/step_bench.py --sweep on an H100
    for H = 64, 128 and 256 (larger blocks of rows spill registers: the tf32x3 split triples operands)."""
    if hidden_size in FUSED_CONFIGS:
        return FUSED_CONFIGS[hidden_size]
    return 32, min(64, max(16, triton.next_power_of_2(hidden_size))), 32 if hidden_size >= 128 else 16, 4


def fused_layer_step(inp: torch.Tensor, rows: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w: FusedWeights,
                     out: torch.Tensor, config: tuple[int, int, int, int] | None = None) -> None:
    """Advance one layer for slots 0..n-1: rows[b]'s c in the table c ([capacity, H]) is replaced, its
    new h is written to out[b]; h (the table's) is only read, the caller scatters out into it afterwards.

    inp: [n, in] contiguous (x, or the layer below's out); rows: [n] int64, distinct except for padding,
    which may point at one scratch row any number of times. config: (BLOCK_B, BLOCK_H, BLOCK_K, num_warps).
    """
    n, n_in = inp.shape
    hidden = h.shape[1]
    block_b, block_h, block_k, num_warps = config or fused_config(hidden)
    _fused_layer_kernel[(triton.cdiv(n, block_b), triton.cdiv(hidden, block_h))](
        inp, rows, h, c, out, w.w_ih_t, w.w_hh_t, w.bias, n, n_in,
        HIDDEN=hidden, BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k, num_warps=num_warps)


if triton is not None:

    @triton.jit
    def _accumulate(acc, a, w_ptr, k, k_mask, w_col, col_mask, HIDDEN: tl.constexpr):
        """acc += a @ (the program's weight columns) for one K tile; w_ptr is a transposed weight [K, 4H]."""
        w = tl.load(w_ptr + k[:, None] * (4 * HIDDEN) + w_col[None, :], mask=k_mask[:, None] & col_mask[None, :],
                    other=0.0)
        return tl.dot(a, w, acc, input_precision="tf32x3")

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
        col = tl.arange(0, 4 * BLOCK_H)  # gate-major: gate q's units of this program at q·BLOCK_H..
        unit = tl.program_id(1) * BLOCK_H + col % BLOCK_H
        w_col = (col // BLOCK_H) * HIDDEN + unit
        col_mask = unit < HIDDEN
        acc = tl.zeros([BLOCK_B, 4 * BLOCK_H], dtype=tl.float32)
        for k0 in range(0, n_in, BLOCK_K):  # the layer's input: x, or the layer below's new h
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < n_in
            a = tl.load(inp_ptr + b[:, None] * n_in + k[None, :], mask=b_mask[:, None] & k_mask[None, :], other=0.0)
            acc = _accumulate(acc, a, w_ih_ptr, k, k_mask, w_col, col_mask, HIDDEN)
        for k0 in range(0, HIDDEN, BLOCK_K):  # the recurrent input: the rows' previous h, gathered
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < HIDDEN
            a = tl.load(h_ptr + rows[:, None] * HIDDEN + k[None, :], mask=b_mask[:, None] & k_mask[None, :],
                        other=0.0)
            acc = _accumulate(acc, a, w_hh_ptr, k, k_mask, w_col, col_mask, HIDDEN)
        acc += tl.load(bias_ptr + w_col, mask=col_mask, other=0.0)[None, :]
        # [BLOCK_B, 4, BLOCK_H] -> [BLOCK_B, BLOCK_H, 2, 2], gate 2p+q at [.., p, q]; split q, then p
        gates = tl.reshape(tl.permute(tl.reshape(acc, [BLOCK_B, 4, BLOCK_H]), [0, 2, 1]), [BLOCK_B, BLOCK_H, 2, 2])
        i_g, f_o = tl.split(gates)
        i, g = tl.split(i_g)
        f, o = tl.split(f_o)
        j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = b_mask[:, None] & (j < HIDDEN)[None, :]
        cell = c_ptr + rows[:, None] * HIDDEN + j[None, :]
        c_new = tl.sigmoid(f) * tl.load(cell, mask=mask, other=0.0) + tl.sigmoid(i) * _tanh(g)
        tl.store(cell, c_new, mask=mask)
        tl.store(out_ptr + b[:, None] * HIDDEN + j[None, :], tl.sigmoid(o) * _tanh(c_new), mask=mask)
