"""More keys than memory: the daemon's state path with state.max_resident_keys, at scale, without a broker.

    python benchmarks/resident_bench.py --keys 10000000 --resident 1000000 --out /tmp/resident.json

What a daemon does per poll, on its own code: ResidentKeys.admit (evict the least recently used, fetch
the missed keys back from the local stores in one go), StreamingPredictor.advance, StateTable.stamp; and
per checkpoint (every --checkpoint-events events) a take of changes (Checkpointer's own: ResidentKeys.
take_changes, changelog.encode) submitted to the local stores as a committed checkpoint would be. No
Kafka: a broker on the same two cores could not hold a changelog of ten million keys (11 GB) in memory,
and its cost per event is measured by e2e_bench.py. Phases: `load` (every key once, in order: the
stores fill), then `zipf` (Zipf(1.1) keys) and `uniform` (uniform keys over all of them), then
`restore`: a fresh process (as a restarted pod) restores every partition from the local stores as
Restorer does with no changelog tail (read, fold, establish, load within the bound). Reported per
phase: events/s, the missed keys fetched back and the cost of admit per missed key; RSS at the end of
each phase against the resident bound's h and c bytes; the local stores' size.

    python benchmarks/resident_bench.py --keys 1000000 --resident 0   # issue 21's RSS per resident key
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
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
from step_bench import make_model  # noqa: E402

from streamlstm.model.artifact import Artifact  # noqa: E402
from streamlstm.model.predictor import StreamingPredictor  # noqa: E402
from streamlstm.serving.restore import install  # noqa: E402
from streamlstm.state import changelog, heap  # noqa: E402
from streamlstm.state.changelog import PartitionRestore  # noqa: E402
from streamlstm.state.resident import ResidentKeys  # noqa: E402
from streamlstm.state.store import LocalStores, StoreMeta  # noqa: E402

CPU = torch.device("cpu")
VERSION = "bench"


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def key_ids(phase: str, events: int, keys: int, start: int, rng: np.random.Generator) -> np.ndarray:
    if phase == "load":
        return np.arange(start, start + events) % keys
    if phase == "zipf":
        return np.minimum(rng.zipf(1.1, events) - 1, keys - 1)
    return rng.integers(0, keys, events)


class Bench:
    def __init__(self, args: argparse.Namespace, directory: Path, establish: bool = True) -> None:
        self.args = args
        self.predictor = StreamingPredictor(Artifact(make_model(args.hidden, args.layers), VERSION, {}, Path(".")), CPU,
                                            state_dtype=args.dtype)
        self.stores = LocalStores(directory, "bench")
        self.resident = ResidentKeys(self.predictor.table, self.stores, args.resident,
                                     (args.layers, args.hidden, None), VERSION)
        for p in range(args.partitions if establish else 0):
            self.stores.establish(p, [], StoreMeta(self.stores.owner, args.layers, args.hidden, VERSION, 0, 0), True)
        self.offset = 0
        self.since_checkpoint = 0
        self.rng = np.random.default_rng(1)

    def poll(self, ids: np.ndarray) -> tuple[int, int, float]:
        """One poll's events, as Daemon._apply steps them; returns (hits, misses, seconds in admit)."""
        keys = [(int(i) % self.args.partitions, f"key-{int(i):09d}") for i in ids]
        admitted = self.resident.admit(keys)
        features = (self.rng.standard_normal((len(keys), 3)) * (3.0, 5.0, 7.0) + (10.0, 20.0, 12.0)).tolist()
        result = self.predictor.advance(keys, features)
        offsets = np.arange(self.offset, self.offset + len(keys), dtype=np.int64)
        self.predictor.table.stamp(result.rows, offsets, offsets)
        self.offset += len(keys)
        self.since_checkpoint += len(keys)
        if self.since_checkpoint >= self.args.checkpoint_events:
            self.checkpoint()
        return (0, 0, 0.0) if admitted is None else (admitted.hits, admitted.misses, admitted.seconds)

    def checkpoint(self) -> None:
        """A take of changes, encoded and submitted as a committed checkpoint's are (Checkpointer._records)."""
        seq = self.stores.issue()
        changes = self.resident.take_changes(seq)
        values = changelog.encode(changes.changed, VERSION)
        entries: dict[int, list[tuple[str, bytes | None]]] = {}
        for (p, key), value in [*zip(changes.changed.keys, values), *changes.encoded]:
            entries.setdefault(p, []).append((key, value))
        self.stores.taken(seq, entries)
        for p, changed in entries.items():
            self.stores.submit(p, changed, (self.args.layers, self.args.hidden, VERSION), self.offset, None, seq)
        self.since_checkpoint = 0

    def phase(self, name: str, events: int) -> dict[str, float]:
        ids = key_ids(name, events, self.args.keys, 0, self.rng)
        hits = misses = 0
        admit_s = 0.0
        started = time.perf_counter()
        for i in range(0, events, self.args.poll):
            h, m, s = self.poll(ids[i:i + self.args.poll])
            hits, misses, admit_s = hits + h, misses + m, admit_s + s
        self.checkpoint()
        self.stores.wait()
        seconds = time.perf_counter() - started
        missed = hits + misses
        figures = {"events": events, "seconds": round(seconds, 1), "events_per_s": round(events / seconds),
                   "fetched": hits, "new": misses, "admit_us_per_missed_key": round(1e6 * admit_s / max(missed, 1), 1),
                   "admit_share": round(admit_s / seconds, 3), "resident": len(self.predictor.table),
                   "evicted_pending": self.resident.evicted_pending(), "rss_bytes": rss_bytes(),
                   "store_bytes": self.stores.size()}
        print(name, json.dumps(figures), flush=True)
        return figures


def restore(args: argparse.Namespace, directory: Path) -> dict[str, float]:
    """A restarted pod's restore from its local stores (Restorer._seed and _finish, no changelog tail)."""
    bench = Bench(args, directory, establish=False)
    baseline = rss_bytes()
    started = time.perf_counter()
    accepts = (args.layers, args.hidden, None)
    for p in range(args.partitions):
        stored = bench.stores.read(p)
        assert stored is not None, f"no local store of partition {p} in {directory}"
        fold = PartitionRestore(p, cut=stored.meta.input_offset)
        fold.seed(bench.stores.owner, stored.keys, stored.values)
        del stored
        install(fold, bench.stores, bench.resident, accepts, VERSION)
        del fold
    heap.give_back()  # as Restorer.step once partitions are finished
    bench.stores.wait()
    figures = {"keys": len(bench.predictor.table), "seconds": round(time.perf_counter() - started, 1),
               "rss_before_keys_bytes": baseline, "rss_bytes": rss_bytes()}
    bench.stores.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--resident", type=int, default=100_000, help="state.max_resident_keys (0: no bound)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="state.dtype")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--poll", type=int, default=2000, help="events per poll (kafka.max_poll_records)")
    parser.add_argument("--checkpoint-events", type=int, default=100_000,
                        help="events between checkpoints (5 s of the daemon's 20 000 events/s)")
    parser.add_argument("--measure-events", type=int, default=1_000_000, help="events of the zipf and uniform phases")
    parser.add_argument("--dir", default="", help="where the local stores go (default: a temporary directory)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--restore-from", type=Path, help=argparse.SUPPRESS)  # the restore phase's own process
    args = parser.parse_args()
    torch.set_num_threads(1)  # the daemon's model.cpu_threads default
    if args.restore_from:
        print(json.dumps(restore(args, args.restore_from)))
        return
    with tempfile.TemporaryDirectory(prefix="resident-bench-", dir=args.dir or None) as directory:
        bench = Bench(args, Path(directory))
        baseline = rss_bytes()
        phases = {"load": bench.phase("load", args.keys)}
        for name in ("zipf", "uniform"):
            phases[name] = bench.phase(name, args.measure_events)
        bench.stores.close()
        done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--restore-from", directory], check=True,
                              capture_output=True, text=True)
        phases["restore"] = json.loads(done.stdout.splitlines()[-1])
        print("restore", json.dumps(phases["restore"]), flush=True)
    state_bytes = (args.resident or args.keys) * 2 * args.layers * args.hidden * (4 if args.dtype == "float32" else 2)
    peak = max(p["rss_bytes"] for p in phases.values())
    per_key = {name: round((p["rss_bytes"] - p.get("rss_before_keys_bytes", baseline)) / (args.resident or args.keys), 1)
               for name, p in phases.items()}
    report = {"benchmark": "resident", "command": shlex.join([sys.executable, *sys.argv]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "parameters": {k: v for k, v in vars(args).items() if k != "out"}, "phases": phases,
              "rss_before_keys_bytes": baseline, "resident_state_bytes": state_bytes,
              "rss_over_bound_bytes": peak - state_bytes,
              "rss_over_bound_per_resident_key": round((peak - baseline - state_bytes) / (args.resident or args.keys), 1),
              "rss_per_resident_key_by_phase": per_key}
    print(json.dumps({k: v for k, v in report.items() if k not in ("phases", "machine")}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
