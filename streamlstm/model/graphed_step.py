"""The CUDA fast path of one step: gather → cell → scatter → head, replayed from CUDA graphs.

Why: at thousands of keys per step the eager step is a few dozen small kernel launches, and launching
them from Python costs more than running them. A graph replays all of them with one launch.

- Fixed sizes: a graph per power-of-two batch size from MIN_BATCH up to `max_batch`, captured the first
  time it is needed. A step of n keys runs the smallest graph holding n; the padding slots point at the
  table's scratch row (StateTable.scratch_row, never given to a key), so they read and write only that
  row and never a key's state.
- The storage: the graphs run on the table's own h and c, the buffers of StateTable.padded_storage
  (scratch row included), and hold their addresses. When the table reallocates them (it grows, or
  restarts with another shape) its storage_generation changes; before each step this is checked, and
  after a change the graphs are dropped and captured anew on the new buffers as they are needed.
  Growth doubles the table, so this is rare.
- Transfers: a step's rows and inputs travel in one pinned buffer as one host→device copy, its
  predictions come back as one device→host copy into pinned memory, and the caller waits once per poll.
- The cell: the fused Triton kernel of fused_cell.py where available and the table holds float32 (one launch
  per layer that gathers h and c and writes c back, then one index_copy_ of every layer's new h), else
  lstm_step's torch operations (on h and c widened to float32 and rounded back: state.dtype).
"""

from __future__ import annotations

import numpy as np
import torch

from ..state.table import StateTable
from .cell import layer_weights, lstm_step
from .fused_cell import fused_available, fused_layer_step, fused_weights
from .network import LSTMForecaster

MIN_BATCH = 16


class GraphedStep:
    def __init__(self, model: LSTMForecaster, table: StateTable, max_batch: int = 8192,
                 fused: bool | None = None) -> None:
        if max_batch < MIN_BATCH or max_batch & (max_batch - 1):
            raise ValueError(f"max_batch must be a power of two of at least {MIN_BATCH}, got {max_batch}")
        spec = model.spec
        self.model, self.table, self.max_batch = model, table, max_batch
        wanted = fused_available(spec.hidden_size) if fused is None else fused
        self.fused = wanted and table.dtype == torch.float32  # the kernel reads and writes float32 state
        self.layers = layer_weights(model.lstm)
        self.fused_layers = fused_weights(self.layers) if self.fused else []
        device = table.device
        self._slot_bytes = 8 + 4 * spec.input_size  # a row index (int64) and the normalised inputs (f32)
        self._staged = torch.empty(max_batch * self._slot_bytes, dtype=torch.uint8, device=device)
        self._hidden = torch.empty(spec.num_layers, max_batch, spec.hidden_size, device=device)
        self._out = torch.empty(max_batch, spec.output_size, device=device)
        self._host_in = torch.empty(0, dtype=torch.uint8, pin_memory=True)
        self._host_out = torch.empty(0, spec.output_size, pin_memory=True)
        self._generation: int | None = None  # the table's storage_generation that _h, _c and the graphs are of
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._follow_storage()

    @staticmethod
    def size_for(n: int) -> int:
        return max(MIN_BATCH, 1 << (n - 1).bit_length())

    @torch.no_grad()
    def run(self, steps: list[tuple[torch.Tensor, list[int]]],
            x: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[float]]:
        """Advance the table one step per (rows, resets) in order: `resets` (rows of that step whose key
        starts over) are zeroed first; `rows` are distinct, at most `max_batch`. `x` holds the normalised
        inputs (float32), one line per row of all steps in order. Returns the predictions and the rows'
        step counts in that order, and each step's device time in seconds (waits for the device once)."""
        self._follow_storage()
        sizes = [self.size_for(len(rows)) for rows, _ in steps]
        host_in = self._pinned_in(sum(sizes) * self._slot_bytes)
        host_out = self._pinned_out(len(x))
        counts, events = [], []
        slot = done = 0
        for (rows, resets), size in zip(steps, sizes):
            n = len(rows)
            graph = self._graphs.get(size) or self._capture(size)
            staged = host_in[slot * self._slot_bytes:(slot + size) * self._slot_bytes]
            idx, inp = (t.numpy() for t in self._views(staged, size))
            idx[:n], idx[n:] = rows.numpy(), self.table.scratch_row
            inp[:n], inp[n:] = x[done:done + n], 0.0
            if resets:
                self.table.reset(resets)
            counts.append(self.table.stepped(rows))
            started, ended = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            started.record()
            self._staged[:len(staged)].copy_(staged, non_blocking=True)
            graph.replay()
            host_out[done:done + n].copy_(self._out[:n], non_blocking=True)
            ended.record()
            events.append((started, ended))
            slot, done = slot + size, done + n
        torch.cuda.current_stream().synchronize()
        seconds = [a.elapsed_time(b) / 1000 for a, b in events]
        return host_out[:done].numpy().copy(), torch.cat(counts).numpy(), seconds

    def _views(self, staged: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The row indices [size] and inputs [size, in] inside a staging buffer (pinned or on the device)."""
        idx = staged[:8 * size].view(torch.int64)
        inp = staged[8 * size:self._slot_bytes * size].view(torch.float32).view(size, -1)
        return idx, inp

    def _follow_storage(self) -> None:
        """Step on the table's h and c as they are now: new buffers take new graphs (see the module doc)."""
        if self._generation == self.table.storage_generation:
            return
        self._h, self._c = self.table.padded_storage()
        self._generation = self.table.storage_generation
        self._graphs.clear()
        self._pool = torch.cuda.graph_pool_handle()

    def _capture(self, size: int) -> torch.cuda.CUDAGraph:
        idx, inp = self._views(self._staged, size)
        idx.fill_(self.table.scratch_row)  # warm-up steps touch only the scratch row
        inp.zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiles the Triton kernel, sets up cuBLAS, outside the capture
            self._step(size)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(size)
        self._graphs[size] = graph
        return graph

    def _step(self, size: int) -> None:
        """What a graph holds: the step on the staged rows and inputs, the predictions into self._out."""
        idx, x = self._views(self._staged, size)
        if self.fused:
            for k, w in enumerate(self.fused_layers):
                inp = x if k == 0 else self._hidden[k - 1, :size]
                fused_layer_step(inp, idx, self._h[k], self._c[k], w, self._hidden[k, :size])
            self._h.index_copy_(1, idx, self._hidden[:, :size])
            top = self._hidden[-1, :size]
        else:
            h, c = lstm_step(x, self._h.index_select(1, idx).float(), self._c.index_select(1, idx).float(), self.layers)
            self._h.index_copy_(1, idx, h.to(self._h.dtype))
            self._c.index_copy_(1, idx, c.to(self._c.dtype))
            top = h[-1]
        self._out[:size] = self.model.predictions(self.model.head(top))

    def _pinned_in(self, nbytes: int) -> torch.Tensor:
        if len(self._host_in) < nbytes:
            self._host_in = torch.empty(2 * nbytes, dtype=torch.uint8, pin_memory=True)
        return self._host_in

    def _pinned_out(self, n: int) -> torch.Tensor:
        if len(self._host_out) < n:
            self._host_out = torch.empty(2 * n, self._host_out.shape[1], pin_memory=True)
        return self._host_out
