"""The per-event state path's CPU cost, for A/B comparisons of one checkout against another.

    python benchmarks/event_path_bench.py [--repo OTHER_CHECKOUT] [--dtype bfloat16]

What the daemon does per poll on the state, and nothing else: StreamingPredictor.advance and
StateTable.stamp of 2 000 events over --keys live keys (H=64, 2 layers, uniform keys, one torch thread),
and every 50 polls a take of changes encoded as changelog values (a checkpoint's share); with
--live-accuracy also the scoring of each forecast against the event it forecast; with --shadow the same
again for a second model of the same size on a table of its own (model.shadow_path). Prints the
process CPU time per event in µs. `--repo` imports streamlstm from another checkout (e.g. a
`git worktree` of an older commit), so two versions run the same harness; interleave runs of each, the VM
is noisy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--repo", default=os.path.join(os.path.dirname(__file__), ".."))
parser.add_argument("--dtype", default="float32", help="state.dtype (a checkout before it has float32 only)")
parser.add_argument("--keys", type=int, default=100_000)
parser.add_argument("--polls", type=int, default=200)
parser.add_argument("--live-accuracy", action="store_true", help="model.live_accuracy (a checkout that has it)")
parser.add_argument("--shadow", action="store_true", help="a shadow model of the same size stepped beside it")
args = parser.parse_args()
sys.path.insert(0, args.repo)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from streamlstm.events import Event  # noqa: E402
from streamlstm.model.artifact import Artifact  # noqa: E402
from streamlstm.model.predictor import StreamingPredictor  # noqa: E402
from streamlstm.state import changelog  # noqa: E402

sys.path.insert(1, os.path.dirname(__file__))  # after the checkout's streamlstm is imported
from step_bench import make_model  # noqa: E402

POLL = 2000


def main() -> None:
    torch.set_num_threads(1)
    extra = {} if args.dtype == "float32" else {"state_dtype": args.dtype}
    artifact = Artifact(make_model(64, 2), "bench", {}, Path("."))
    lanes = []
    for _ in range(2 if args.shadow else 1):
        predictor = StreamingPredictor(artifact, torch.device("cpu"), **extra)
        accuracy = None
        if args.live_accuracy:
            from streamlstm.serving.accuracy import live_accuracy
            from streamlstm.serving.metrics import Metrics

            accuracy = live_accuracy(artifact, predictor.table, Metrics())
        lanes.append((predictor, accuracy))
    rng = np.random.default_rng(0)
    names = [(i % 4, f"key-{i:09d}") for i in range(args.keys)]

    def poll(ids: np.ndarray, offset: int) -> None:
        keys = [names[i] for i in ids]
        features = (rng.standard_normal((len(keys), 3)) * (3.0, 5.0, 7.0) + (10.0, 20.0, 12.0)).tolist()
        events = [Event(key, f, None) for (_, key), f in zip(keys, features)]  # decoded, as the daemon has them
        offsets = np.arange(offset, offset + len(keys), dtype=np.int64)
        for predictor, accuracy in lanes:
            result = predictor.advance(keys, [e.features for e in events])
            if accuracy is not None:
                accuracy.score(result.rows, result.steps, events, result.predictions)
            predictor.table.stamp(result.rows, offsets, offsets)

    def take(seq: int) -> None:
        for predictor, _ in lanes:
            changelog.encode(predictor.table.take_changes(seq).changed, "bench")

    for start in range(0, args.keys, POLL):  # every key live before timing
        poll(np.arange(start, min(start + POLL, args.keys)), start)
    take(1)
    started, events = time.process_time(), 0
    for k in range(args.polls):
        poll(rng.integers(0, args.keys, POLL), args.keys + events)
        events += POLL
        if k % 50 == 49:
            take(k + 2)
    scored = (" live_accuracy" if args.live_accuracy else "") + (" shadow" if args.shadow else "")
    print(f"{Path(sys.modules['streamlstm'].__file__ or '').parent.parent} {args.dtype}{scored}: "
          f"{1e6 * (time.process_time() - started) / events:.2f} µs an event")


if __name__ == "__main__":
    main()
