"""The CUDA fast path equals the eager step: the fused layer kernel, the graphed step, and the predictor
on CUDA against the predictor on the CPU. The CUDA tests skip on machines without a GPU; the fused kernel
runs there too, in Triton's interpreter (conftest.py), wherever Triton is installed."""

import copy
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from streamlstm.model.artifact import Artifact
from streamlstm.model.cell import layer_weights, lstm_step
from streamlstm.model.fused_cell import (
    fused_available,
    fused_layer_step,
    fused_weights,
    triton,
)
from streamlstm.model.graphed_step import GraphedStep
from streamlstm.model.network import LSTMForecaster, ModelSpec
from streamlstm.model.predictor import StreamingPredictor
from streamlstm.state.table import Rows, StateTable

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
KERNEL = CUDA if torch.cuda.is_available() else CPU  # on the CPU: Triton's interpreter (conftest.py)
TOL = {"atol": 1e-5, "rtol": 0}


def make_model(hidden: int, layers: int, seed: int = 0, task: str = "regression") -> LSTMForecaster:
    torch.manual_seed(seed)
    outputs = ("load",) if task == "regression" else ("low", "mid", "high")
    targets = ((10.0,), (3.0,)) if task == "regression" else ((), ())
    spec = ModelSpec(task, ("load", "temp", "hour"), outputs, hidden, layers, (10.0, 20.0, 12.0), (3.0, 5.0, 7.0),
                     *targets)
    return LSTMForecaster(spec)


def predictor(model: LSTMForecaster, device: torch.device, **kwargs) -> StreamingPredictor:
    return StreamingPredictor(Artifact(copy.deepcopy(model), "test", {}, Path(".")), device, **kwargs)


def test_a_cpu_daemon_never_loads_triton(tmp_path):
    """CUDA builds of torch bring Triton, on machines without a GPU too: a CPU daemon must not pay for it
    (import time, memory, and lines that are not log records at its exit)."""
    pytest.importorskip("triton")
    code = ("import sys, torch; from conftest import make_model; import streamlstm.serving.daemon; "
            "from streamlstm.model.artifact import load_artifact; from streamlstm.model.predictor import StreamingPredictor; "
            f"artifact = load_artifact(make_model({str(tmp_path / 'model')!r})); "
            "StreamingPredictor(artifact, torch.device('cpu')).advance([(0, 'k')], [[1.0, 2.0, 3.0]]); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def random_state(layers: int, rows: int, hidden: int, seed: int,
                 device: torch.device = CUDA) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(layers, rows, hidden, generator=g).to(device),
            torch.randn(layers, rows, hidden, generator=g).to(device))


@pytest.mark.skipif(triton is None, reason="needs Triton")
@pytest.mark.parametrize("hidden", [16, 48, 128, 256])
@pytest.mark.parametrize("n", [1, 7, 100, 1000])
def test_fused_layer_equals_lstm_step_and_writes_only_its_rows_c(hidden, n):
    capacity = 1200
    layer = layer_weights(make_model(hidden, 1, seed=hidden).lstm.to(KERNEL))
    h, c = random_state(1, capacity + 1, hidden, seed=n, device=KERNEL)
    rows = torch.randperm(capacity, generator=torch.Generator().manual_seed(n))[:n].to(KERNEL)
    padded = torch.cat([rows, torch.full((9,), capacity, device=KERNEL)])  # padding: the scratch row
    x = torch.randn(n + 9, 3, device=KERNEL)
    expected_h, expected_c = lstm_step(x[:n], h[:, rows], c[:, rows], layer)
    out = torch.empty(n + 9, hidden, device=KERNEL)
    before_h, before_c = h.clone(), c.clone()
    fused_layer_step(x, padded, h[0], c[0], fused_weights(layer)[0], out)
    torch.testing.assert_close(out[:n], expected_h[0], **TOL)
    torch.testing.assert_close(c[:, rows], expected_c, **TOL)
    others = torch.ones(capacity + 1, dtype=torch.bool, device=KERNEL)
    others[padded] = False
    assert torch.equal(h, before_h) and torch.equal(c[:, others], before_c[:, others])


@needs_cuda
@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.skipif(
    not fused_available(128), reason="needs Triton"))])
@pytest.mark.parametrize("hidden,layers", [(64, 1), (128, 2)])
def test_graphed_step_equals_the_eager_step(fused, hidden, layers):
    """Several steps of sizes that are and are not graph sizes; state carries from step to step."""
    model = make_model(hidden, layers).to(CUDA)
    table, eager = StateTable(layers, hidden, CUDA, capacity=8192), StateTable(layers, hidden, CUDA, capacity=8192)
    h, c = random_state(layers, 8192, hidden, seed=1)
    for state in (table, eager):
        state.h.copy_(h)
        state.c.copy_(c)
    graphed = GraphedStep(model, table, max_batch=4096, fused=fused)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n in [1, 7, 16, 100, 1000, 4096, 3000, 1000]:
            rows = torch.randperm(8192, generator=gen)[:n]
            x = torch.randn(n, 3, generator=gen)
            predictions, steps, _ = graphed.run([(rows, [])], x.numpy())
            h, c = lstm_step(x.to(CUDA), *eager.gather(rows), layer_weights(model.lstm))
            expected_steps = eager.scatter(rows, h, c)
            expected = model.predictions(model.head(h[-1])).cpu().numpy()
            np.testing.assert_allclose(predictions, expected, **TOL)
            assert np.array_equal(steps, expected_steps.numpy())
    assert graphed.fused == fused and sorted(graphed._graphs) == [16, 128, 1024, 4096]
    torch.testing.assert_close(table.h, eager.h, **TOL)  # rows never stepped were left exactly alone too
    torch.testing.assert_close(table.c, eager.c, **TOL)
    assert torch.equal(table.steps, eager.steps)


@needs_cuda
@pytest.mark.parametrize("task,hidden,layers,max_batch", [
    ("regression", 16, 2, 8192), ("regression", 48, 1, 64), ("classification", 128, 2, 16),
])
def test_the_predictor_on_cuda_equals_the_predictor_on_the_cpu(task, hidden, layers, max_batch):
    """Random polls with repeated keys, resets, 3 000 keys (the table grows twice past its capacity of
    1 024), batch sizes that are not powers of two, and steps split at max_batch."""
    model = make_model(hidden, layers, task=task)
    cpu, cuda = predictor(model, CPU), predictor(model, CUDA, max_batch=max_batch)
    rng = random.Random(hidden)
    for _ in range(40):
        n = rng.randrange(1, 700)
        keys = [(rng.randrange(4), f"k{rng.randrange(3000)}") for _ in range(n)]
        features = [[rng.gauss(10, 3), rng.gauss(20, 5), rng.randrange(24)] for _ in range(n)]
        fresh = np.array([rng.random() < 0.03 for _ in range(n)])
        a, b = cpu.advance(keys, features, fresh), cuda.advance(keys, features, fresh)
        np.testing.assert_allclose(b.predictions, a.predictions, **TOL)
        assert np.array_equal(a.steps, b.steps) and np.array_equal(a.rows, b.rows)
        sizes = [size for size, _ in b.step_stats]
        assert sum(sizes) == n and max(sizes) <= max_batch
    assert cuda.table.h.shape[1] > 2048 and cuda.graphed is not None
    ca, cb = cpu.table.take_changes(), cuda.table.take_changes()
    assert ca.changed.keys == cb.changed.keys and np.array_equal(ca.changed.steps, cb.changed.steps)
    np.testing.assert_allclose(cb.changed.h, ca.changed.h, **TOL)
    np.testing.assert_allclose(cb.changed.c, ca.changed.c, **TOL)


@pytest.mark.parametrize("device", [CPU, pytest.param(CUDA, marks=needs_cuda)])
def test_a_table_grown_by_advance_still_takes_a_restore(device):
    """Growth inside advance must leave tensors a restore (outside any torch mode) may write to."""
    model = make_model(16, 2)
    p = predictor(model, device)
    keys = [(0, f"k{i}") for i in range(1500)]
    p.advance(keys, [[10.0, 20.0, 12.0]] * len(keys))
    restored = Rows([(1, "r")], np.ones((2, 1, 16), np.float32), np.ones((2, 1, 16), np.float32),
                    np.array([5]), np.array([9]), np.array([100]))
    p.table.load(restored)
    result = p.advance([(1, "r"), (0, "k1")], [[10.0, 20.0, 12.0]] * 2)
    assert result.steps.tolist() == [6, 2]
