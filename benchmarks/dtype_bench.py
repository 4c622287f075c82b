"""state.dtype: what keeping h and c in bfloat16 or float16 costs in accuracy, and what it saves.

    python benchmarks/dtype_bench.py --out benchmarks/results/dtype.json

On the demo's data and model (`streamlstm demo`'s training on the Tourism quarterly series, H=64, one
layer), for each state.dtype:
- the deviation of its offline predictions (`streamlstm predict` with that state.dtype: the state rounded
  after every step) from float32's, over every event of the replay (in-sample and the unseen tail), in
  the data's units (log visitors); the tail's MAE against the naive forecast's, as the demo scores it;
- the same over one key of --long-steps events (the series back to back), to show the deviation does not
  grow with a key's age;
- how streaming (StreamingPredictor, the daemon's step) agrees with `predict` under the same state.dtype:
  the share of predictions within 1e-5 and the largest difference (values that fall on a rounding
  boundary round apart, README "Compact state");
- the bytes a key: h and c in memory, and a changelog value (also at H=64, 2 layers).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from machine import machine  # noqa: E402

from streamlstm.demo.run import DEMO_TRAINING  # noqa: E402
from streamlstm.demo.tourism import TourismFiles, interleave, tail_mae, write_tourism_events  # noqa: E402
from streamlstm.events import Event  # noqa: E402
from streamlstm.model.artifact import Artifact  # noqa: E402
from streamlstm.model.predictor import StreamingPredictor  # noqa: E402
from streamlstm.state.changelog import value_size  # noqa: E402
from streamlstm.training.reference import score_events  # noqa: E402
from streamlstm.training.train import train  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
POLL = 500  # events per advance: the daemon's kafka.max_poll_records


def deviation(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    d = np.abs(a - b).max(axis=1)
    return {"max": float(d.max()), "mean": float(d.mean()), "p99": float(np.quantile(d, 0.99))}


def streamed(artifact: Artifact, events: list[Event], dtype: str) -> np.ndarray:
    predictor = StreamingPredictor(artifact, torch.device("cpu"), state_dtype=dtype)
    return np.concatenate([predictor.advance([(0, e.key) for e in events[i:i + POLL]],
                                             [e.features for e in events[i:i + POLL]]).predictions
                           for i in range(0, len(events), POLL)])


def by_key(events: list[Event], predictions: np.ndarray) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for e, p in zip(events, predictions.tolist()):
        out.setdefault(e.key, []).append(p)
    return out


def long_key(files: TourismFiles, steps: int) -> list[Event]:
    values = [v for series in files.values.values() for v in series]
    values = (values * (steps // len(values) + 1))[:steps]
    return [Event("long", [v], None) for v in values]


def bytes_per_key(layers: int, hidden: int) -> dict[str, dict[str, int]]:
    return {dtype: {"h_and_c": 2 * layers * hidden * (4 if dtype == "float32" else 2),
                    "changelog_value": value_size(layers, hidden, dtype)} for dtype in DTYPES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--long-steps", type=int, default=10_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dtype-bench-") as work:
        files = write_tourism_events(Path(work) / "data")
        artifact = train(files.train, Path(work) / "model", DEMO_TRAINING, log=lambda _: None)
    spec = artifact.spec
    events = [Event(key, [value], None) for _, key, value in interleave(files.values)]
    long = long_key(files, args.long_steps)
    offline = {dtype: score_events(artifact, events, state_dtype=dtype)[0] for dtype in DTYPES}
    long_offline = {dtype: score_events(artifact, long, state_dtype=dtype)[0] for dtype in DTYPES}
    results = {}
    for dtype in DTYPES:
        stream = streamed(artifact, events, dtype)
        off = np.abs(stream - offline[dtype]).max(axis=1)  # per event
        mae = tail_mae(by_key(events, offline[dtype]), files)
        tail = len(long) // 10
        results[dtype] = {
            "replay_vs_float32": deviation(offline[dtype], offline["float32"]),
            "long_key_vs_float32": deviation(long_offline[dtype], long_offline["float32"]),
            "long_key_last_tenth_vs_float32": deviation(long_offline[dtype][-tail:], long_offline["float32"][-tail:]),
            "tail_mae": mae.model, "naive_tail_mae": mae.naive,
            "streaming_vs_predict_same_dtype": {"share_within_1e-5": float(np.mean(off <= 1e-5)),
                                                **deviation(stream, offline[dtype])},
            "streaming_vs_float32": deviation(stream, offline["float32"]),
        }
        print(dtype, json.dumps(results[dtype]), flush=True)
    report = {"benchmark": "dtype", "command": shlex.join([sys.executable, *sys.argv]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "model": {"hidden_size": spec.hidden_size, "num_layers": spec.num_layers, "training": "demo"},
              "replay_events": len(events), "long_key_steps": len(long), "data_scale_mean_abs": float(
                  np.abs(np.concatenate([np.asarray(v) for v in files.values.values()])).mean()),
              "results": results, "bytes_per_key": {"demo (H=64, 1 layer)": bytes_per_key(spec.num_layers, spec.hidden_size),
                                                    "H=64, 2 layers": bytes_per_key(2, 64)},
              "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps({k: v for k, v in report.items() if k not in ("machine", "results")}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
