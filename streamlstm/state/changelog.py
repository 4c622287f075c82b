"""The state changelog's record format, and how a partition's state is rebuilt from its records.

A record is keyed by the state key (UTF-8) and its value is, little-endian:

    magic   2 bytes  b"SL"
    format  u8       the element type of h and c: 1 float32, 2 bfloat16, 3 float16 (state.dtype)
    layers  u8       num_layers
    hidden  u32      hidden_size
    steps   i64      events applied to the key since its state was zero
    offset  i64      input offset of the last event applied (the restore cut compares against it)
    time    i64      time of that event, ms (event time or processing time: the TTL clock)
    model   16 bytes model version, ASCII, space-padded
    h       element x layers x hidden, layer by layer
    c       element x layers x hidden

A record of any element type is read into a table of any other (dtypes.convert): a changed state.dtype
carries the state over, rounded once when it narrows.

A dropped key (end, reset, expiry) is a tombstone: a null value, with the input offset that dropped it
in the header `streamlstm.offset`.

An owner marker says who serves the partition from then on: key OWNER_KEY, value b"SL", 0x80, then the
owner's id (its local store directory's). Each daemon writes one when it starts serving a partition, so
a local store whose partition was served elsewhere since is recognised by the other owner's marker in
the changelog after it. Knows nothing of Kafka clients or of torch.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import compress, repeat
from typing import NamedTuple, Protocol

import numpy as np

from .dtypes import BY_CODE, ELEMENTS, Element, convert
from .table import Rows

MAGIC = b"SL"
HEADER = struct.Struct("<2sBBIqqq16s")
OFFSET_AT = 16  # byte position of `offset` within HEADER
MODEL_AT = 32  # and of `model`
TOMBSTONE_OFFSET = "streamlstm.offset"
_PREFIXES = frozenset(MAGIC + bytes([code]) for code in BY_CODE)
_OFFSET = struct.Struct("<q")
OWNER_KEY = b"\x00streamlstm.owner"
_OWNER_PREFIX = MAGIC + bytes([0x80])


class ChangelogRecord(Protocol):
    """What the fold reads of a changelog record (transport.api.Record and kafka-python's records have it)."""

    @property
    def offset(self) -> int: ...

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...

    @property
    def headers(self) -> list[tuple[str, bytes | None]]: ...


def _layout(num_layers: int, hidden_size: int, element: Element) -> np.dtype:
    """HEADER and the h and c that follow it, as one numpy record: values built and read in one go."""
    return np.dtype({"names": ["magic", "format", "layers", "hidden", "steps", "offset", "time", "model", "state"],
                     "formats": [("u1", 2), "u1", "u1", "<u4", "<i8", "<i8", "<i8", ("u1", 16),
                                 (element.storage, (2, num_layers, hidden_size))],
                     "offsets": [0, 2, 3, 4, 8, OFFSET_AT, 24, MODEL_AT, HEADER.size],
                     "itemsize": HEADER.size + 2 * num_layers * hidden_size * element.storage.itemsize})


def value_size(num_layers: int, hidden_size: int, dtype: str) -> int:
    """The bytes of one key's changelog value."""
    return _layout(num_layers, hidden_size, ELEMENTS[dtype]).itemsize


def _version_field(model_version: str) -> bytes:
    return model_version.encode("ascii")[:16].ljust(16)


ENCODE_CHUNK = 8192  # rows built per buffer: a checkpoint of a million keys needs no second gigabyte


def encode(rows: Rows, model_version: str) -> list[bytes]:
    """One changelog value per key of `rows` (h and c in the element type they are held in), built
    ENCODE_CHUNK at a time in one array of records (a checkpoint encodes thousands)."""
    layers, n, hidden = rows.h.shape
    element = next(e for e in ELEMENTS.values() if e.storage == rows.h.dtype)
    layout = _layout(layers, hidden, element)
    size = layout.itemsize
    values: list[bytes] = []
    for start in range(0, n, ENCODE_CHUNK):
        part = slice(start, min(start + ENCODE_CHUNK, n))
        out = np.empty(part.stop - start, layout)  # every byte is a field
        out["magic"], out["format"], out["layers"], out["hidden"] = np.frombuffer(MAGIC, np.uint8), element.code, layers, hidden
        out["model"] = np.frombuffer(_version_field(model_version), np.uint8)
        out["steps"], out["offset"], out["time"] = rows.steps[part], rows.offsets[part], rows.times[part]
        state = out["state"]
        state[:, 0], state[:, 1] = rows.h[:, part].transpose(1, 0, 2), rows.c[:, part].transpose(1, 0, 2)
        flat = out.view(np.uint8).data  # copied once, each row into its value: not the whole buffer first
        values += [flat[i : i + size].tobytes() for i in range(0, len(out) * size, size)]
    return values


def owner_marker(owner: str) -> bytes:
    return _OWNER_PREFIX + owner.encode("ascii")


def value_offset(value: bytes) -> int:
    """The input offset a state value (not a tombstone) reflects."""
    return _OFFSET.unpack_from(value, OFFSET_AT)[0]


def tombstone_headers(offset: int) -> list[tuple[str, bytes]]:
    return [(TOMBSTONE_OFFSET, str(offset).encode())]


def source_offset(value: bytes | None, headers: Iterable[tuple[str, bytes | None]]) -> int | None:
    """The input offset a record reflects, or None when the record is not ours to read."""
    if value is None:
        for name, raw in headers:
            if name == TOMBSTONE_OFFSET:
                return int(raw) if raw and raw.isdigit() else None
        return None
    if len(value) < HEADER.size or value[:3] not in _PREFIXES:
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
    owner: str | None = None  # set by seed(): the folded records come after that owner's local store
    skipped_beyond_cut: int = 0
    unreadable: int = 0
    replayed: int = 0  # changelog records folded
    next_offset: int = 0  # the changelog offset after the last record folded (or where reading began)
    foreign: str | None = None  # after seed(): another owner's marker was read, the store is outdated
    touched: set[str] | None = None  # after seed(): the keys the changelog's records changed
    # Per key, the kept record's source offset and value, in two dicts of ints and bytes: such dicts are
    # never tracked by the garbage collector, where one dict of (offset, value) tuples was walked by
    # every full collection (at 1 000 000 keys, half the time spent reading the changelog).
    _offsets: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _values: dict[str, bytes | None] = field(default_factory=dict, init=False, repr=False)

    @property
    def latest(self) -> dict[str, tuple[int, bytes | None]]:
        """Per key, the record kept so far: (source offset, value), a tombstone's value None."""
        return dict(zip(self._offsets, zip(self._offsets.values(), self._values.values())))

    def seed(self, owner: str, keys: list[str], values: list[bytes]) -> None:
        """Start from a local store's records (each key's latest up to some changelog offset): the records
        folded after this are the changelog's from that offset on."""
        self.owner = owner
        self._offsets = dict(zip(keys, map(value_offset, values)))
        self._values = dict(zip(keys, values))
        self.touched = set()

    def add(self, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes | None]]) -> None:
        self.add_many([_Raw(self.next_offset, key, value, headers)])

    def add_many(self, records: Iterable[ChangelogRecord]) -> None:
        """add() for each record in turn, the per-record work cut down: a restore's Python time goes
        here and into the reader. About 0.75 µs a record against 0.95 µs through add(), most of it the
        dict updates; parsing the offsets with one np.frombuffer per poll instead saved only 4 %."""
        offsets, values, get, cut, touched = self._offsets, self._values, self._offsets.get, self.cut, self.touched
        unpack, prefixes = _OFFSET.unpack_from, _PREFIXES
        unreadable = beyond = count = 0
        record = None
        for record in records:
            count += 1
            value = record.value
            if value is not None and value[:3] in prefixes and len(value) >= HEADER.size:
                offset: int | None = unpack(value, OFFSET_AT)[0]
            elif record.key == OWNER_KEY and value is not None and value[:3] == _OWNER_PREFIX:
                self._marked(value[3:].decode("ascii", "replace"))
                continue
            else:
                offset = source_offset(value, record.headers)
            key = record.key
            if key is None or offset is None:
                unreadable += 1
            elif offset >= cut:
                beyond += 1
            else:
                name = key.decode("utf-8", "replace")
                if offset >= get(name, -1):
                    offsets[name] = offset
                    values[name] = value
                    if touched is not None:
                        touched.add(name)
        if record is not None:
            self.next_offset = record.offset + 1
        self.replayed += count
        self.unreadable += unreadable
        self.skipped_beyond_cut += beyond

    def _marked(self, owner: str) -> None:
        if self.owner is not None and owner != self.owner and self.foreign is None:
            self.foreign = owner

    def adopt(self, other: PartitionRestore, version: str) -> list[str]:
        """Take from `other`, the same partition's fold of another changelog, each key whose record there
        is of model `version` and newer than this fold's (or as new, where this fold's is of another
        version): a promoted shadow's state, where this changelog does not hold it yet (a crash before
        the checkpoint that follows the promotion, or a partition from a pod that has not promoted).
        Returns the keys taken."""
        wanted = _version_field(version)
        model = slice(MODEL_AT, MODEL_AT + len(wanted))
        offsets, values, taken = self._offsets, self._values, []
        for name, value in other._values.items():
            if value is None or value[model] != wanted:
                continue
            offset, mine = other._offsets[name], offsets.get(name, -1)
            if offset > mine or (offset == mine and (values[name] or b"")[model] != wanted):
                offsets[name], values[name] = offset, value
                taken.append(name)
        if self.touched is not None:
            self.touched.update(taken)
        return taken

    def entries(self) -> list[tuple[str, bytes | None]]:
        """What a local store takes from this fold: after seed(), the keys the records changed (None:
        dropped); otherwise every live key's record."""
        if self.touched is not None:
            return [(name, self._values[name]) for name in self.touched]
        return [(name, value) for name, value in self._values.items() if value is not None]

    def rows(self, num_layers: int, hidden_size: int, version: str | None = None,
             dtype: str = "float32") -> tuple[Rows, int]:
        """The live keys' state (h and c as `dtype`), and how many records were incompatible (those keys
        start over): of another model's shape, or, if `version` is given, written by another model version.

        The values are read as one array of records (one copy of them all), not one at a time."""
        values = list(self._values.values())
        rows = decode(self.shard, list(self._values), values, num_layers, hidden_size, version, dtype)
        live = len(values) - values.count(None)
        return rows, live - len(rows.keys)


def decode(shard: int, names: list[str], values: list[bytes | None], num_layers: int, hidden_size: int,
           version: str | None = None, dtype: str = "float32") -> Rows:
    """The keys' state from their values, h and c as `dtype`, skipping tombstones and values of another
    shape (or, if `version` is given, of another model version): read as one array of records per element
    type (one, unless state.dtype changed), not one at a time."""
    target = ELEMENTS[dtype]
    sizes = {code: _layout(num_layers, hidden_size, e).itemsize for code, e in BY_CODE.items()}
    kinds = [value[2] if value is not None and len(value) == sizes.get(value[2]) else 0 for value in values]
    present = set(kinds) - {0}
    if len(present) > 1:
        parts = [_decode_as(shard, list(compress(names, [k == code for k in kinds])),
                            list(compress(values, [k == code for k in kinds])), num_layers, hidden_size, version,
                            BY_CODE[code], target) for code in sorted(present)]
        return Rows([key for part in parts for key in part.keys], *(
            np.concatenate([getattr(part, name) for part in parts], axis=axis)
            for name, axis in (("h", 1), ("c", 1), ("steps", 0), ("offsets", 0), ("times", 0))))
    source = BY_CODE[present.pop()] if present else target
    return _decode_as(shard, list(compress(names, kinds)), list(compress(values, kinds)), num_layers, hidden_size,
                      version, source, target)


def _decode_as(shard: int, names: list[str], values: list[bytes | None], num_layers: int, hidden_size: int,
               version: str | None, source: Element, target: Element) -> Rows:
    """decode() of values all of element type `source` and the right size."""
    layout = _layout(num_layers, hidden_size, source)
    # numpy's own allocation (huge pages where the kernel has them): b"".join's page faults cost 3x the copy
    records = np.fromiter(values, f"S{layout.itemsize}", len(names)).view(layout)
    fits = (records["layers"] == num_layers) & (records["hidden"] == hidden_size)
    if version is not None:
        fits &= (records["model"] == np.frombuffer(_version_field(version), np.uint8)).all(axis=1)
    if not fits.all():
        names = list(compress(names, fits.tolist()))
        records = records[fits]
    state = records["state"]
    h, c = (np.array(convert(state[:, i].transpose(1, 0, 2), source, target), order="C") for i in (0, 1))
    return Rows(list(zip(repeat(shard), names)), h, c, records["steps"].copy(), records["offset"].copy(),
                records["time"].copy())


class _Raw(NamedTuple):
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
