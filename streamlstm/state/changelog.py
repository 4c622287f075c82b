"""The state changelog's record format, and how a partition's state is rebuilt from its records.

A record is keyed by the state key (UTF-8) and its value is, little-endian:

    magic   2 bytes  b"SL"
    format  u8       1
    layers  u8       num_layers
    hidden  u32      hidden_size
    steps   i64      events applied to the key since its state was zero
    offset  i64      input offset of the last event applied (the restore cut compares against it)
    time    i64      time of that event, ms (event time or processing time: the TTL clock)
    model   16 bytes model version, ASCII, space-padded
    h       f32 x layers x hidden, layer by layer
    c       f32 x layers x hidden

A dropped key (end, reset, expiry) is a tombstone: a null value, with the input offset that dropped it
in the header `streamlstm.offset`. Knows nothing of Kafka clients or of torch.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from .table import Rows, StateKey

MAGIC = b"SL"
FORMAT = 1
HEADER = struct.Struct("<2sBBIqqq16s")
OFFSET_AT = 16  # byte position of `offset` within HEADER
TOMBSTONE_OFFSET = "streamlstm.offset"


def _version_field(model_version: str) -> bytes:
    return model_version.encode("ascii")[:16].ljust(16)


def encode(rows: Rows, model_version: str) -> list[bytes]:
    """One changelog value per key of `rows`."""
    layers, n, hidden = rows.h.shape
    version = _version_field(model_version)
    width = layers * hidden
    body = np.concatenate([rows.h.transpose(1, 0, 2).reshape(n, width), rows.c.transpose(1, 0, 2).reshape(n, width)],
                          axis=1).astype("<f4")
    return [
        HEADER.pack(MAGIC, FORMAT, layers, hidden, steps, offset, time, version) + body[i].tobytes()
        for i, (steps, offset, time) in enumerate(zip(rows.steps.tolist(), rows.offsets.tolist(), rows.times.tolist()))
    ]


def tombstone_headers(offset: int) -> list[tuple[str, bytes]]:
    return [(TOMBSTONE_OFFSET, str(offset).encode())]


def source_offset(value: bytes | None, headers: Iterable[tuple[str, bytes | None]]) -> int | None:
    """The input offset a record reflects, or None when the record is not ours to read."""
    if value is None:
        for name, raw in headers:
            if name == TOMBSTONE_OFFSET:
                return int(raw) if raw and raw.isdigit() else None
        return None
    if len(value) < HEADER.size or value[:2] != MAGIC or value[2] != FORMAT:
        return None
    return struct.unpack_from("<q", value, OFFSET_AT)[0]


@dataclass
class PartitionRestore:
    """Folds one changelog partition, in log order, into the state as of input offset `cut`.

    For each key it keeps the record with the highest source offset below `cut`, the later one of equal
    offsets (an expiry tombstone follows the state it expires). Records at or beyond the cut were
    written after the last commit and describe events that will be consumed again: using them would
    apply those events twice. Going by offset rather than log order also ignores a late write from a
    zombie, a former owner still writing after its partition moved on.
    """

    shard: int
    cut: int
    latest: dict[str, tuple[int, bytes | None]] = field(default_factory=dict)
    skipped_beyond_cut: int = 0
    unreadable: int = 0

    def add(self, key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, bytes | None]]) -> None:
        offset = source_offset(value, headers)
        if key is None or offset is None:
            self.unreadable += 1
        elif offset >= self.cut:
            self.skipped_beyond_cut += 1
        else:
            name = key.decode("utf-8", "replace")
            if offset >= self.latest.get(name, (-1, None))[0]:
                self.latest[name] = (offset, value)

    def rows(self, num_layers: int, hidden_size: int, version: str | None = None) -> tuple[Rows, int]:
        """The live keys' state, and how many records were incompatible (those keys start over): of
        another model's shape, or, if `version` is given, written by another model version."""
        width = 2 * num_layers * hidden_size
        expected = HEADER.size + 4 * width
        wanted = None if version is None else _version_field(version)
        keys, headers, bodies, mismatched = [], [], [], 0
        for key, (_, value) in self.latest.items():
            if value is None:
                continue
            fields = HEADER.unpack_from(value)
            if ((fields[2], fields[3]) != (num_layers, hidden_size) or len(value) != expected
                    or wanted not in (None, fields[7])):
                mismatched += 1
                continue
            keys.append((self.shard, key))
            headers.append(fields[4:7])
            bodies.append(value[HEADER.size:])
        n = len(keys)
        flat = np.frombuffer(b"".join(bodies), dtype="<f4").reshape(n, 2, num_layers, hidden_size)
        meta = np.array(headers, dtype=np.int64).reshape(n, 3)
        state = Rows(keys, flat[:, 0].transpose(1, 0, 2).copy(), flat[:, 1].transpose(1, 0, 2).copy(),
                     meta[:, 0].copy(), meta[:, 1].copy(), meta[:, 2].copy())
        return state, mismatched


def changelog_key(key: StateKey) -> bytes:
    """A state record's Kafka key: the event key, UTF-8 (the partition is the record's own)."""
    return key[1].encode("utf-8")
