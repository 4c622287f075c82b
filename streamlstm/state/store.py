"""The local state store: per input partition, each key's latest changelog record on local disk, so a
restart replays only the changelog written after it instead of the whole changelog.

One SQLite file per partition (standard library; WAL, so a kill -9 mid-write leaves the last committed
write; 16 KiB pages for 1 KB values), holding key -> changelog value (the record format of changelog.py)
with a CRC-32 of key and value that SQLite itself does not keep, and one row of metadata: the owner (this
directory's id), the state shape and model version, the input offset the state reflects and the changelog
offset from which records may be missing from it. Writes run on a thread of their own (SQLite releases the
GIL while it works) in the order they are submitted. Knows nothing of Kafka or of torch.
"""

from __future__ import annotations

import fcntl
import logging
import queue
import sqlite3
import threading
import uuid
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import IO, NamedTuple

from ..errors import UsageError
from ..faults import crash_point
from . import heap

log = logging.getLogger(__name__)

SCHEMA = 1
Entry = tuple[str, bytes | None]  # key, changelog value (None: dropped)
FETCH_CHUNK = 500  # keys per SELECT of a fetch (SQLite's limit on bound parameters is far above)


class StoreError(Exception):
    """A local store that cannot be trusted or read: the partition restores from the changelog instead."""


class StoreMeta(NamedTuple):
    owner: str
    layers: int
    hidden: int
    model: str
    input_offset: int  # the next input offset: the state reflects exactly the events before it
    changelog_offset: int  # changelog records from this offset on may be missing from the store


class StoredState(NamedTuple):
    meta: StoreMeta
    keys: list[str]
    values: list[bytes]


def _checksum(key: str, value: bytes) -> int:
    return zlib.crc32(value, zlib.crc32(key.encode("utf-8", "surrogatepass")))


class PartitionStore:
    """One partition's SQLite file; its methods are called by one thread at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None  # for fetches, beside the writer's: WAL lets both work
        self.stored: int | None = None  # keys in it after the last write (None: not counted yet)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA page_size = 16384")  # before the first table: 1 KB values fit in pages
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")  # the changelog is the durable copy; a torn store is refused
            db.execute("CREATE TABLE IF NOT EXISTS meta (schema INTEGER, owner TEXT, layers INTEGER, hidden INTEGER, "
                       "model TEXT, input_offset INTEGER, changelog_offset INTEGER)")
            db.execute("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value BLOB NOT NULL, "
                       "crc INTEGER NOT NULL) WITHOUT ROWID")
            self._db = db
        return self._db

    def read(self) -> StoredState | None:
        """Everything, checked; None if the store holds nothing yet. Raises StoreError if it is damaged."""
        if not self.path.exists():
            return None
        try:
            db = self._connection()
            rows = db.execute("SELECT schema, owner, layers, hidden, model, input_offset, changelog_offset "
                              "FROM meta").fetchall()
            if not rows:
                return None
            if len(rows) != 1 or rows[0][0] != SCHEMA:
                raise StoreError(f"{self.path}: metadata of another schema or repeated ({len(rows)} rows)")
            meta = StoreMeta(*rows[0][1:])
            keys, values, crcs = [], [], []
            for key, value, crc in db.execute("SELECT key, value, crc FROM state"):
                keys.append(key)
                values.append(value)
                crcs.append(crc)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: unreadable ({exc})") from exc
        bad = sum(_checksum(k, v) != crc for k, v, crc in zip(keys, values, crcs))
        if bad:
            raise StoreError(f"{self.path}: {bad} of {len(keys)} records fail their checksum")
        return StoredState(meta, keys, values)

    def fetch(self, keys: list[str]) -> dict[str, bytes]:
        """The stored values of those of `keys` the store holds, checked. Raises StoreError if it cannot."""
        if not self.path.exists():
            return {}
        found: dict[str, bytes] = {}
        try:
            if self._reader is None:
                self._reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            for marks, chunk in _chunks(keys):
                for key, value, crc in self._reader.execute(f"SELECT key, value, crc FROM state WHERE key IN ({marks})",
                                                            chunk):
                    if _checksum(key, value) != crc:
                        raise StoreError(f"{self.path}: the record of key {key!r} fails its checksum")
                    found[key] = value
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: unreadable ({exc})") from exc
        return found

    def write(self, entries: Iterable[Entry], meta: StoreMeta, replace: bool) -> None:
        """One transaction: all of it or, after a crash, none of it. `replace`: the entries are all there is.
        Keeps `stored` up to date from the keys each write adds and deletes (one scan to start from)."""
        db = self._connection()
        stored = self.stored
        db.execute("BEGIN")
        try:
            if replace:
                db.execute("DELETE FROM state")
                stored = 0
            elif stored is None:
                stored = db.execute("SELECT count(*) FROM state").fetchone()[0]
            # Each key's last entry (a key changed and then dropped, or dropped and seen again, ends as its
            # last says), in key order: rows rewritten in B-tree order cost half what event order costs.
            latest = sorted(dict(entries).items())
            dropped = [(key,) for key, value in latest if value is None]
            live = [(key, value, _checksum(key, value)) for key, value in latest if value is not None]
            present = sum(db.execute(f"SELECT count(*) FROM state WHERE key IN ({marks})", chunk).fetchone()[0]
                          for marks, chunk in _chunks([key for key, _, _ in live]))  # the pages the inserts touch
            stored += len(live) - present - db.executemany("DELETE FROM state WHERE key = ?", dropped).rowcount
            db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?, ?)", live)
            db.execute("DELETE FROM meta")
            db.execute("INSERT INTO meta VALUES (?, ?, ?, ?, ?, ?, ?)", (SCHEMA, *meta))
            crash_point("store-write")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.stored = stored

    def remove(self) -> None:
        self.close()
        self.stored = None
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def size(self) -> int:
        total = 0
        for path in self.path.parent.glob(self.path.name + "*"):
            try:
                total += path.stat().st_size
            except FileNotFoundError:  # SQLite's transient files come and go
                pass
        return total

    def close(self) -> None:
        for db in (self._db, self._reader):
            if db is not None:
                db.close()
        self._db = self._reader = None


class LocalStores:
    """The stores of one daemon's partitions under one directory, and the thread that writes them.

    A partition's store takes checkpoint writes only once it is established (a restore wrote its whole
    state: `establish`): a store that missed a write (it failed, or its partition was restored
    elsewhere meanwhile) must never look complete again. Changes sent outside a checkpoint (when
    partitions are revoked) are held and written with that partition's next checkpoint.

    Each take of changes has a number (`issue`); `written(partition)` says up to which take all of a
    partition's changes are in its store, which is what a bound on resident keys needs to know before it
    evicts a key and fetches it back from the store later.
    """

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._dir_lock = _lock(directory)
            owner_file = directory / "owner"
            if not owner_file.exists():
                owner_file.write_text(uuid.uuid4().hex + "\n")
            self.owner = owner_file.read_text().strip()
        except OSError as exc:
            raise UsageError(f"config: state.dir: {directory} cannot be used ({exc}); point it at a writable "
                             "directory (a volume in Kubernetes)") from exc
        self._stores: dict[int, PartitionStore] = {}
        self._meta: dict[int, StoreMeta] = {}  # of the established stores, as last submitted
        self._held: dict[int, tuple[list[Entry], set[int]]] = {}  # entries and the takes they come from
        self._queue: queue.Queue[tuple[int, list[Entry], StoreMeta, bool, set[int]] | None] = queue.Queue()
        self._seq = 0
        self._outstanding: dict[int, set[int]] = {}  # per partition, the takes whose changes are not written
        self._lock = threading.Lock()  # for _outstanding and failures, shared with the writer
        self.failures: set[int] = set()  # partitions whose store failed: what it held is gone
        self._thread = threading.Thread(target=self._write_all, name="local-store-writer", daemon=True)
        self._thread.start()

    def store(self, partition: int) -> PartitionStore:
        if partition not in self._stores:
            self._stores[partition] = PartitionStore(self.directory / f"{self.name}-{partition}.sqlite")
        return self._stores[partition]

    def read(self, partition: int) -> StoredState | None:
        """A partition's stored state, after every write submitted before."""
        self._queue.join()
        return self.store(partition).read()

    def fetch(self, partition: int, keys: list[str]) -> dict[str, bytes]:
        """What the partition's store holds of `keys` (as of the writes done so far). Raises StoreError."""
        return self.store(partition).fetch(keys)

    def issue(self) -> int:
        """The number of a new take of changes, higher than any before; until `taken` says which partitions
        it took changes of, it counts as not written for every partition."""
        seq = self._next_seq()
        with self._lock:
            for partition in self._meta:
                self._outstanding.setdefault(partition, set()).add(seq)
        return seq

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def taken(self, seq: int, partitions: Iterable[int]) -> None:
        """Take `seq` took changes of `partitions` (only): those are not in the stores until written."""
        took = set(partitions)
        with self._lock:
            for partition, outstanding in self._outstanding.items():
                if partition not in took:
                    outstanding.discard(seq)

    def written(self, partition: int) -> int:
        """Every change of `partition` taken by a take up to this number is in its store."""
        with self._lock:
            outstanding = self._outstanding.get(partition)
            return min(outstanding) - 1 if outstanding else self._seq

    def establish(self, partition: int, entries: list[Entry], meta: StoreMeta, replace: bool) -> int:
        """After a restore: the store holds the partition's whole state, written in the background. Returns
        the take number of the write."""
        self._held.pop(partition, None)
        self._meta[partition] = meta
        seq = self._next_seq()
        with self._lock:
            self._outstanding[partition] = {seq}
        self._queue.put((partition, entries, meta, replace, {seq}))
        return seq

    def disown(self, partitions: Iterable[int]) -> None:
        """Partitions no longer ours (their files stay, for a return): no more writes until re-established."""
        for partition in partitions:
            self._meta.pop(partition, None)
            self._held.pop(partition, None)
            with self._lock:
                self._outstanding.pop(partition, None)

    def hold(self, partition: int, entries: list[Entry], seq: int) -> None:
        """Changes sent to the changelog without a commit: written with the partition's next checkpoint."""
        if partition in self._meta:
            held, seqs = self._held.setdefault(partition, ([], set()))
            held.extend(entries)
            seqs.add(seq)

    def submit(self, partition: int, entries: list[Entry], shape: tuple[int, int, str], input_offset: int | None,
               changelog_offset: int | None, seq: int) -> None:
        """A checkpoint's changes of one partition (taken by take `seq`), acknowledged, with the input offset
        committed (None: the same as before) and the offset after the partition's last state record
        acknowledged (if known)."""
        meta = self._meta.get(partition)
        if meta is None:
            return
        layers, hidden, model = shape
        meta = meta._replace(layers=layers, hidden=hidden, model=model,
                             input_offset=meta.input_offset if input_offset is None else input_offset,
                             changelog_offset=max(meta.changelog_offset, changelog_offset or 0))
        self._meta[partition] = meta
        held, seqs = self._held.pop(partition, ([], set()))
        self._queue.put((partition, held + entries, meta, False, seqs | {seq}))

    def stored_keys(self) -> int:
        """Keys in the stores of this daemon's partitions, as of their last writes."""
        return sum(self.store(p).stored or 0 for p in list(self._meta))

    def take_failures(self) -> set[int]:
        with self._lock:
            failures, self.failures = self.failures, set()
        return failures

    def wait(self) -> None:
        self._queue.join()

    def size(self) -> int:
        return sum(store.size() for store in list(self._stores.values()) if store.path.exists())

    def _write_all(self) -> None:
        while (job := self._queue.get()) is not None:
            partition, entries, meta, replace, seqs = job
            try:
                self.store(partition).write(entries, meta, replace)
                with self._lock:
                    self._outstanding.get(partition, set()).difference_update(seqs)
            except (sqlite3.Error, OSError) as exc:
                log.error("partition %d: local store write failed (%s); it is removed and the partition will "
                          "restore from the changelog next time", partition, exc)
                self._meta.pop(partition, None)
                self.store(partition).remove()
                with self._lock:
                    self.failures.add(partition)
            finally:
                del job, entries  # the values die here, not at the next job
                if self._queue.empty():
                    heap.give_back()  # before task_done: once wait() returns, the memory is back
                self._queue.task_done()
        self._queue.task_done()

    def close(self) -> None:
        """After the writes submitted so far."""
        self._queue.put(None)
        self._thread.join()
        for store in self._stores.values():
            store.close()
        self._dir_lock.close()


def _chunks(keys: list[str]) -> Iterable[tuple[str, list[str]]]:
    """`keys` in chunks for `key IN (...)`, each with its placeholders."""
    for i in range(0, len(keys), FETCH_CHUNK):
        chunk = keys[i:i + FETCH_CHUNK]
        yield ",".join("?" * len(chunk)), chunk


def _lock(directory: Path) -> IO[bytes]:
    """Hold the directory for this process (released at exit, even on kill -9): two daemons writing the
    same stores would each take the other's for its own."""
    lock = open(directory / "lock", "wb")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UsageError(f"config: state.dir: {directory} is in use by another streamlstm process; give each daemon "
                         "(each replica on one host) a state.dir of its own") from None
    return lock
