"""Step kernel: the per-event loop the tutorials use against the batched step (issue 6, benchmark 2).

For each hidden size (--hidden, default 64 128 256), layer count (--layers, 1 2) and keys per step
(--batch, 1 8 64 512 1024 8192) it measures key-steps per second of:

  per_event      one model call per event: nn.LSTM on [1, 1, in] with the key's (h, c) kept in a Python
                 dict, then the head, the prediction copied to the host (the tutorials' serving loop).
                 It does not depend on the batch size and is timed on --per-event events.
Each figure is the median of WINDOWS timing windows (per_event: --per-event events each; the others:
--budget seconds each): on a shared VM a neighbour's burst then moves one window, not the figure.
  lstm_step      the raw batched cell (cell.lstm_step) on already gathered h and c: no table, no head.
  advance        StreamingPredictor.advance with B distinct keys per call: table lookup, gather, step,
                 scatter, head, predictions back as numpy. Keys cycle through max(2B, 1024) live keys,
                 admitted before timing. On CUDA this is the graphed fast path.
on CUDA also:
  eager_step     gather → lstm_step → scatter → head as eager torch operations (host time, synchronised)
  graph_step     one replay of the step's CUDA graph (GraphedStep), device time from CUDA events
  graph_unfused  the same with torch operations in the graph instead of the fused Triton layer kernel
  graph_io       GraphedStep.run for one step: pinned host→device copy, replay, device→host copy, wait
  advance_eager  advance with cuda_graphs=False

Speedup is advance (and lstm_step) over per_event. On CUDA, `bound` is the memory-bandwidth bound: the
device's copy bandwidth (read + write of a 1 GiB device-to-device copy, measured in the same run)
divided by the bytes a fused gather → cell → scatter must move per key-step:

  bytes = layers · 4 · H · 4          (h and c of every layer read from the table and written back)
        + 8 + 4 · inputs + 4 · outputs (the row index, the inputs, the prediction)
        + 4 · parameters / B           (the weights, read once per step)

`bound_3pass` counts h and c read and written three times (gather, step, scatter as separate passes, as
in the eager step). `flops` per key-step (2 · 4H · (in_k + H) per layer, plus the head) shows the compute
side; the run also measures a large fp32 matmul (TF32 off) for the device's plain-fp32 FLOP/s.
--sweep first times the fused layer kernel's block sizes at the largest batch and uses the fastest;
--profile writes the kernels of one graphed and one eager step (H=128, 2 layers, largest batch) to
--profile-out. The JSON is rewritten after every row, so a run cut short keeps what it measured.

Run from the repository root:

    python benchmarks/step_bench.py                      # CPU: ~3 minutes on 2 cores
    python benchmarks/step_bench.py --device cuda --sweep --profile
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import machine  # noqa: E402

from streamlstm.model import fused_cell  # noqa: E402
from streamlstm.model.artifact import Artifact  # noqa: E402
from streamlstm.model.cell import layer_weights, lstm_step  # noqa: E402
from streamlstm.model.fused_cell import fused_layer_step, fused_weights  # noqa: E402
from streamlstm.model.graphed_step import GraphedStep  # noqa: E402
from streamlstm.model.network import LSTMForecaster, ModelSpec  # noqa: E402
from streamlstm.model.predictor import StreamingPredictor  # noqa: E402
from streamlstm.state.table import StateTable  # noqa: E402

INPUTS, OUTPUTS = 3, 1
WINDOWS = 5  # timing windows per figure; the median is reported


def make_model(hidden: int, layers: int) -> LSTMForecaster:
    torch.manual_seed(hidden * 10 + layers)
    spec = ModelSpec("regression", ("a", "b", "c"), ("a",), hidden, layers, (10.0, 20.0, 12.0), (3.0, 5.0, 7.0),
                     (10.0,), (3.0,))
    return LSTMForecaster(spec).eval()


def keys_and_features(n: int, seed: int = 0) -> tuple[list[tuple[int, str]], np.ndarray]:
    rng = np.random.default_rng(seed)
    keys = [(i % 8, f"sensor-{i:08d}") for i in range(n)]
    return keys, (rng.standard_normal((n, INPUTS)) * (3.0, 5.0, 7.0) + (10.0, 20.0, 12.0)).astype(np.float32)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def per_call(fn: Callable[[], object], device: torch.device, budget_s: float, max_calls: int = 10_000) -> float:
    """Seconds per call (host wall time, the device waited for): one warm-up call, then the median of
    WINDOWS windows of calls, each until `budget_s` has passed (at least two calls)."""
    fn()
    sync(device)
    windows = []
    for _ in range(WINDOWS):
        calls, started = 0, time.perf_counter()
        while calls < 2 or (time.perf_counter() - started < budget_s and calls < max_calls):
            fn()
            calls += 1
        sync(device)
        windows.append((time.perf_counter() - started) / calls)
    return statistics.median(windows)


def device_time(fn: Callable[[], object], reps: int) -> float:
    """Seconds per call on the device (CUDA events around `reps` back-to-back calls, after a warm-up)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / reps


# --------------------------------------------------------------------------- the two ways to serve


def per_event_rate(model: LSTMForecaster, device: torch.device, events: int) -> float:
    """Events per second of the tutorials' loop: one model call per event, state in a dict."""
    keys, features = keys_and_features(1024)
    states: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def one(i: int) -> None:
        key = keys[i % len(keys)][1]
        x = model.normalise(torch.from_numpy(features[i % len(keys)]).view(1, 1, INPUTS).to(device))
        out, states[key] = model.lstm(x, states.get(key))
        model.predictions(model.head(out[:, -1])).cpu()

    rates = []
    with torch.no_grad():
        for i in range(min(events, 200)):  # warm-up, and every key gets a state
            one(i)
        for _ in range(WINDOWS):
            started = time.perf_counter()
            for i in range(events):
                one(i)
            rates.append(events / (time.perf_counter() - started))
    return statistics.median(rates)


def batched_rates(model: LSTMForecaster, device: torch.device, batch: int, budget_s: float) -> dict[str, float]:
    """Key-steps per second of the batched step in each of its forms (see the module doc)."""
    population = max(2 * batch, 1024)
    keys, features = keys_and_features(population, seed=batch)
    feature_lists = features.tolist()
    predictor = StreamingPredictor(Artifact(model, "bench", {}, Path(".")), device)
    calls = [(keys[i:i + batch], feature_lists[i:i + batch]) for i in range(0, population, batch)]
    for call_keys, call_features in calls:  # admit every key before timing
        predictor.advance(call_keys, call_features)
    turn = iter(range(10**9))

    def advance() -> None:
        predictor.advance(*calls[next(turn) % len(calls)])

    rates = {"advance": batch / per_call(advance, device, budget_s)}
    layers = layer_weights(model.lstm)
    x = torch.from_numpy(features[:batch]).to(device)
    rows = torch.tensor([predictor.table.row(k) for k in keys[:batch]])
    h, c = predictor.table.gather(rows)
    with torch.no_grad():
        rates["lstm_step"] = batch / per_call(lambda: lstm_step(x, h, c, layers), device, budget_s)
    if device.type == "cuda":
        rates.update(cuda_rates(predictor, rows, x, budget_s))
        eager = StreamingPredictor(Artifact(model, "bench", {}, Path(".")), device, cuda_graphs=False)
        for call_keys, call_features in calls:
            eager.advance(call_keys, call_features)
        turn_eager = iter(range(10**9))
        rates["advance_eager"] = batch / per_call(lambda: eager.advance(*calls[next(turn_eager) % len(calls)]),
                                                  device, budget_s)
    return rates


def cuda_rates(predictor: StreamingPredictor, rows: torch.Tensor, x: torch.Tensor,
               budget_s: float) -> dict[str, float]:
    model, table, graphed = predictor.model, predictor.table, predictor.graphed
    batch = len(rows)
    idx = rows.to(x.device)
    layers = layer_weights(model.lstm)
    x_host = model.normalise(x).cpu().numpy()

    @torch.no_grad()
    def eager_step() -> None:
        h, c = lstm_step(x, table.h.index_select(1, idx), table.c.index_select(1, idx), layers)
        table.h.index_copy_(1, idx, h)
        table.c.index_copy_(1, idx, c)
        model.predictions(model.head(h[-1]))

    rates = {"eager_step": batch / per_call(eager_step, x.device, budget_s)}
    graphed.run([(rows, [])], x_host)  # captures this size's graph and stages these rows
    graph = graphed._graphs[graphed.size_for(batch)]
    rates["graph_step"] = batch / device_time(graph.replay, reps=max(20, min(2000, 2_000_000 // batch)))
    rates["graph_io"] = batch / per_call(lambda: graphed.run([(rows, [])], x_host), x.device, budget_s)
    unfused = GraphedStep(model, StateTable(table.h.shape[0], table.h.shape[2], x.device, table.h.shape[1]),
                          fused=False)
    unfused.run([(rows, [])], x_host)
    graph = unfused._graphs[unfused.size_for(batch)]
    rates["graph_unfused"] = batch / device_time(graph.replay, reps=max(20, min(2000, 2_000_000 // batch)))
    return rates


# --------------------------------------------------------------------------- the bound


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting the read and the write."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.nbytes / device_time(lambda: dst.copy_(src), reps=20)


def bytes_per_key_step(spec: ModelSpec, batch: int, state_passes: int = 1) -> float:
    """state_passes=1: a fused step's minimum; 3: gather, step and scatter each read and write h and c."""
    parameters = sum(4 * spec.hidden_size * ((spec.input_size if k == 0 else spec.hidden_size) + spec.hidden_size + 1)
                     for k in range(spec.num_layers)) + spec.output_size * (spec.hidden_size + 1)
    return (state_passes * spec.num_layers * 4 * spec.hidden_size * 4 + 8 + 4 * spec.input_size
            + 4 * spec.output_size + 4 * parameters / batch)


def fp32_gemm_flops() -> float:
    """FLOP/s of a large fp32 matmul (no TF32): what plain fp32 arithmetic can reach on this device."""
    a = torch.randn(8192, 8192, device="cuda")
    return 2 * 8192**3 / device_time(lambda: a @ a, reps=5)


def flops_per_key_step(spec: ModelSpec) -> int:
    h = spec.hidden_size
    return sum(2 * 4 * h * ((spec.input_size if k == 0 else h) + h) for k in range(spec.num_layers)) \
        + 2 * h * spec.output_size


# --------------------------------------------------------------------------- extras: sweep, profile


def in_graph(fn: Callable[[], object], calls: int) -> Callable[[], object]:
    """`calls` calls of fn captured in one CUDA graph: device time without Python's launch overhead."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


SWEEP = [(32, 32, 16, 4), (32, 64, 16, 4), (64, 32, 16, 4), (64, 64, 16, 4), (64, 64, 16, 8), (128, 32, 16, 4),
         (128, 32, 16, 8), (32, 64, 32, 4), (64, 64, 32, 8), (128, 64, 16, 8)]  # (BLOCK_B, BLOCK_H, BLOCK_K, warps)


def sweep(hidden_sizes: list[int], batch: int, budget_s: float = 150.0) -> list[dict]:
    """Device time of one fused layer (layer 2's shape: input H) per block configuration; the fastest
    becomes the configuration of that hidden size for the rest of the run. Stops after `budget_s`."""
    found, started = [], time.perf_counter()
    for hidden in sorted(hidden_sizes, key=lambda h: h != 128):  # the target size first
        layer = fused_weights(layer_weights(make_model(hidden, 2).lstm.cuda()))[1]
        h = torch.randn(2 * batch + 1, hidden, device="cuda")
        c = torch.randn_like(h)
        rows = torch.randperm(2 * batch, device="cuda")[:batch]
        inp, out = torch.randn(batch, hidden, device="cuda"), torch.empty(batch, hidden, device="cuda")
        timed = {}
        for config in SWEEP:
            if time.perf_counter() - started > budget_s:
                break
            s = device_time(in_graph(lambda: fused_layer_step(inp, rows, h, c, layer, out, config), 10), 20) / 10
            timed[config] = s
            found.append({"hidden": hidden, "config": config, "us": round(s * 1e6, 2)})
            print(found[-1], flush=True)
        if timed:
            fused_cell.FUSED_CONFIGS[hidden] = min(timed, key=timed.get)
    return found


def profile(batch: int, out: Path) -> None:
    """The kernels of one graphed step and one eager step, H=128, 2 layers, by device time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model = make_model(128, 2).cuda()
    predictor = StreamingPredictor(Artifact(model, "bench", {}, Path(".")), torch.device("cuda"))
    keys, features = keys_and_features(batch)
    predictor.advance(keys, features.tolist())
    rows = torch.tensor([predictor.table.row(k) for k in keys])
    graph = predictor.graphed._graphs[predictor.graphed.size_for(batch)]
    idx, x = rows.cuda(), torch.from_numpy(features).cuda()
    layers = layer_weights(model.lstm)
    tables = []
    for name, fn in [("graph replay", graph.replay), ("eager step", lambda: lstm_step(
            x, predictor.table.h.index_select(1, idx), predictor.table.c.index_select(1, idx), layers))]:
        fn()
        torch.cuda.synchronize()
        with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        tables.append(f"== {name}, {batch} keys, 10 calls\n"
                      + prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    out.write_text("\n\n".join(tables) + "\n")
    print(f"profile: {out}")


# --------------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 512, 1024, 8192])
    parser.add_argument("--per-event", type=int, default=None, help="events timed in the per-event loop")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed calls per figure")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-out", type=Path, default=Path("benchmarks/results/step_profile.txt"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    events = args.per_event or (1000 if cuda else 500)
    budget = args.budget or (0.2 if cuda else 0.3)
    out = args.out or Path(f"benchmarks/results/step_{device.type}.json")
    report = {"benchmark": "step kernel", "command": "python " + shlex.join(sys.argv),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(device),
              "parameters": {"inputs": INPUTS, "outputs": OUTPUTS, "per_event_events": events, "budget_s": budget}}
    if cuda:
        report["copy_bandwidth_gbs"] = round(copy_bandwidth() / 1e9, 1)
        report["fp32_gemm_tflops"] = round(fp32_gemm_flops() / 1e12, 1)
        print(f"device {report['machine']['device']}: copy bandwidth {report['copy_bandwidth_gbs']} GB/s, "
              f"fp32 matmul {report['fp32_gemm_tflops']} TFLOP/s")
    if args.sweep:
        report["sweep"] = sweep(args.hidden, max(args.batch))
    if cuda:
        report["fused_configs"] = {h: fused_cell.fused_config(h) for h in args.hidden}
        print(f"fused layer (BLOCK_B, BLOCK_H, BLOCK_K, num_warps): {report['fused_configs']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    report["results"] = rows = []
    cols = ["advance", "lstm_step"]
    if cuda:
        cols += ["eager_step", "graph_step", "graph_unfused", "graph_io", "advance_eager"]
    print(f"{'H':>4} {'L':>2} {'B':>5} {'per_event':>10} " + " ".join(f"{c:>13}" for c in cols)
          + f" {'speedup':>8}"
          + (f" {'bound':>12} {'graph%':>7} {'eager%':>7} {'g%3pass':>7} {'TFLOPs':>6}" if cuda else ""))
    for hidden in args.hidden:
        for layers in args.layers:
            model = make_model(hidden, layers).to(device)
            per_event = per_event_rate(model, device, events)
            for batch in args.batch:
                rates = batched_rates(model, device, batch, budget)
                row = {"hidden": hidden, "layers": layers, "batch": batch, "per_event": round(per_event, 1),
                       **{k: round(v, 1) for k, v in rates.items()},
                       "speedup": round(rates["advance"] / per_event, 2),
                       "lstm_step_speedup": round(rates["lstm_step"] / per_event, 2),
                       "bytes_per_key_step": round(bytes_per_key_step(model.spec, batch), 1),
                       "flops_per_key_step": flops_per_key_step(model.spec)}
                line = (f"{hidden:>4} {layers:>2} {batch:>5} {per_event:>10.0f} "
                        + " ".join(f"{rates[c]:>13.0f}" for c in cols) + f" {row['speedup']:>7.1f}x")
                if cuda:
                    bound = report["copy_bandwidth_gbs"] * 1e9 / row["bytes_per_key_step"]
                    bound_3pass = report["copy_bandwidth_gbs"] * 1e9 / bytes_per_key_step(model.spec, batch, 3)
                    row.update(bound=round(bound, 1), graph_fraction=round(rates["graph_step"] / bound, 4),
                               eager_fraction=round(rates["eager_step"] / bound, 4), bound_3pass=round(bound_3pass, 1),
                               graph_fraction_3pass=round(rates["graph_step"] / bound_3pass, 4),
                               graph_tflops=round(rates["graph_step"] * row["flops_per_key_step"] / 1e12, 2))
                    line += (f" {bound:>12.0f} {100 * row['graph_fraction']:>6.1f}%"
                             f" {100 * row['eager_fraction']:>6.1f}%"
                             f" {100 * row['graph_fraction_3pass']:>6.1f}% {row['graph_tflops']:>6.1f}")
                print(line, flush=True)
                rows.append(row)
                out.write_text(json.dumps(report, indent=2) + "\n")
    if args.profile and cuda:
        profile(max(args.batch), args.profile_out)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
