"""The changelog record format and the restore rule, without Kafka."""

import numpy as np
import torch

from streamlstm.state import changelog
from streamlstm.state.changelog import PartitionRestore
from streamlstm.state.table import Rows, StateTable
from streamlstm.transport.api import Record

CPU = torch.device("cpu")


def rows_of(keys, offsets, layers=2, hidden=3, seed=0):
    rng = np.random.default_rng(seed)
    n = len(keys)
    return Rows(list(keys), rng.standard_normal((layers, n, hidden)).astype(np.float32),
                rng.standard_normal((layers, n, hidden)).astype(np.float32), np.arange(1, n + 1),
                np.array(offsets, dtype=np.int64), np.full(n, 1_700_000_000_000, dtype=np.int64))


def test_a_record_holds_h_c_steps_offset_time_and_model_version_in_a_documented_layout():
    rows = rows_of([(2, "a"), (2, "ü")], [5, 9])
    values = changelog.encode(rows, "0123456789abcdef")
    assert len(values[0]) == changelog.HEADER.size + 2 * 2 * 3 * 4 == 96
    magic, fmt, layers, hidden, steps, offset, _, version = changelog.HEADER.unpack_from(values[1])
    assert (magic, fmt, layers, hidden, steps, offset, version) == (b"SL", 1, 2, 3, 2, 9, b"0123456789abcdef")
    h = np.frombuffer(values[1], "<f4", 6, changelog.HEADER.size).reshape(2, 3)
    assert np.array_equal(h, rows.h[:, 1])
    restore = PartitionRestore(shard=2, cut=100)
    for key, value in zip(rows.keys, values):
        restore.add(key[1].encode(), value, [])
    state, incompatible = restore.rows(2, 3)
    assert incompatible == 0 and state.keys == rows.keys
    for name in ("h", "c", "steps", "offsets", "times"):
        assert np.array_equal(getattr(state, name), getattr(rows, name)), name
    assert changelog.encode(rows_of([], []), "v") == []  # a checkpoint of tombstones only


def test_restore_keeps_per_key_the_latest_record_below_the_committed_offset():
    """Records at or beyond the cut describe events that will be consumed again: using them would
    apply those events twice. A tombstone below the cut removes the key. A late record of an older
    offset (a zombie's write) does not replace a newer one."""
    restore = PartitionRestore(shard=0, cut=20)
    history = [("a", 3), ("b", 4), ("a", 12), ("a", 25), ("b", None), ("c", 30), ("a", 7)]
    for key, offset in history:
        if offset is None:
            restore.add(key.encode(), None, changelog.tombstone_headers(15))
        else:
            restore.add(key.encode(), changelog.encode(rows_of([(0, key)], [offset]), "v")[0], [])
    state, _ = restore.rows(2, 3)
    assert state.keys == [(0, "a")] and state.offsets.tolist() == [12]
    assert restore.skipped_beyond_cut == 2


def test_unreadable_and_other_shaped_records_are_skipped_and_counted():
    restore = PartitionRestore(shard=0, cut=10)
    restore.add(b"x", b"garbage", [])
    restore.add(None, changelog.encode(rows_of([(0, "y")], [1]), "v")[0], [])
    restore.add(b"z", None, [])
    restore.add(b"t1", None, [(changelog.TOMBSTONE_OFFSET, b"soon")])  # a tombstone whose offset is not one
    restore.add(b"t2", None, [(changelog.TOMBSTONE_OFFSET, None)])
    restore.add(b"wide", changelog.encode(rows_of([(0, "wide")], [1], hidden=4), "v")[0], [])
    restore.add(b"ok", changelog.encode(rows_of([(0, "ok")], [1]), "v")[0], [])
    state, incompatible = restore.rows(2, 3)
    assert restore.unreadable == 5 and incompatible == 1 and state.keys == [(0, "ok")]


def test_a_table_loaded_from_its_own_changes_continues_exactly():
    table = StateTable(2, 3, CPU)
    rows = table.rows([(1, "a"), (1, "b")])
    table.scatter(rows, torch.randn(2, 2, 3), torch.randn(2, 2, 3))
    table.stamp(rows.numpy(), np.array([4, 5]), np.array([40, 50]))
    changed = table.take_changes().changed
    restore = PartitionRestore(shard=1, cut=6)
    for key, value in zip(changed.keys, changelog.encode(changed, "v")):
        restore.add(key[1].encode(), value, [])
    other = StateTable(2, 3, CPU)
    other.load(restore.rows(2, 3)[0])
    again = other.rows([(1, "a"), (1, "b")])
    for mine, theirs in zip(table.gather(rows), other.gather(again)):
        assert torch.equal(mine, theirs)
    assert other.steps[again].tolist() == [1, 1] and other.offsets[again.numpy()].tolist() == [4, 5]
    assert other.take_changes().changed.keys == []


def test_under_reset_state_only_the_served_versions_records_are_restored():
    """model.on_reload: reset_state restores no state written by another model version (those keys start
    over, counted as incompatible); keep_state restores any record of the right shape."""
    restore = PartitionRestore(shard=0, cut=100)
    for version, rows in (("old-model", rows_of([(0, "a")], [1])), ("new-model", rows_of([(0, "b")], [2]))):
        for key, value in zip(rows.keys, changelog.encode(rows, version)):
            restore.add(key[1].encode(), value, [])
    assert restore.rows(2, 3)[0].keys == [(0, "a"), (0, "b")]
    state, incompatible = restore.rows(2, 3, "new-model")
    assert state.keys == [(0, "b")] and incompatible == 1


def random_changelog(seed: int, cut: int, n: int = 600) -> list[Record]:
    """A changelog partition as a restore may find it: few keys, so each has many records; offsets drawn
    from a narrow range, so equal offsets are common and older ones arrive after newer ones (a zombie's
    writes); some at or beyond the cut; tombstones; records of another shape or model version; and
    unreadable ones (garbage, no key, a tombstone without a usable offset, a foreign format byte)."""
    rng = np.random.default_rng(seed)
    keys = [f"k{i}" for i in range(12)] + ["ü", "\udcff", "\udcfe"]
    records = []
    for i in range(n):
        name = keys[rng.integers(len(keys))]
        key = name.encode("utf-8", "surrogateescape")  # b"\xff", b"\xfe": not UTF-8, both read as "\ufffd"
        offset = int(rng.integers(cut + 5))
        value, headers = None, changelog.tombstone_headers(offset)
        kind = rng.choice(["state"] * 12 + ["tombstone"] * 3 + ["wide", "other_model", "garbage", "no_key",
                                                                    "no_offset", "foreign"])
        if kind in ("state", "wide", "other_model", "foreign", "no_key"):
            shaped = rows_of([(0, name)], [offset], hidden=4 if kind == "wide" else 3, seed=i)
            value, headers = changelog.encode(shaped, "old" if kind == "other_model" else "new")[0], []
        if kind == "foreign":
            value = value[:2] + bytes([2]) + value[3:]
        elif kind == "garbage":
            value = bytes(rng.integers(256, size=int(rng.integers(60)), dtype=np.uint8))
        elif kind == "no_offset":
            headers = [(changelog.TOMBSTONE_OFFSET, [b"soon", b"", None][rng.integers(3)])]
        records.append(Record("changelog", 0, i, 0, None if kind == "no_key" else key, value, headers))
    return records


def test_a_polls_records_folded_at_once_give_what_folding_them_one_by_one_gives():
    """add_many (a poll's records at once, as Restorer feeds them) keeps exactly what add keeps, counts
    the same and gives the same rows, whatever the polls' sizes; both keep per key the record with the
    highest source offset below the cut, the later of equal offsets."""
    for seed in range(20):
        cut = 25
        records = random_changelog(seed, cut)
        one_by_one, at_once = PartitionRestore(shard=3, cut=cut), PartitionRestore(shard=3, cut=cut)
        for r in records:
            one_by_one.add(r.key, r.value, r.headers)
        ends = sorted(np.random.default_rng(seed).integers(len(records), size=8).tolist()) + [len(records)]
        for start, end in zip([0, *ends], ends):
            at_once.add_many(records[start:end])

        readable = [(changelog.source_offset(r.value, r.headers), r.offset, r) for r in records if r.key is not None]
        kept: dict[str, tuple[int, int, Record]] = {}
        for offset, position, r in readable:
            if offset is not None and offset < cut:
                name = r.key.decode("utf-8", "replace")
                kept[name] = max(kept.get(name, (-1, -1, r)), (offset, position, r), key=lambda k: k[:2])
        assert at_once.latest == one_by_one.latest == {name: (o, r.value) for name, (o, _, r) in kept.items()}
        assert (at_once.skipped_beyond_cut, at_once.unreadable) == (one_by_one.skipped_beyond_cut,
                                                                    one_by_one.unreadable)
        assert at_once.skipped_beyond_cut > 0 and at_once.unreadable > 0
        for version in (None, "new"):
            (mine, mismatched), (theirs, expected) = at_once.rows(2, 3, version), one_by_one.rows(2, 3, version)
            assert mine.keys == theirs.keys and mismatched == expected
            for name in ("h", "c", "steps", "offsets", "times"):
                assert np.array_equal(getattr(mine, name), getattr(theirs, name)), name


def test_rows_decode_each_kept_record_as_it_was_written():
    """rows() reads all values in one go; each key's h, c, steps, offset and time are its record's."""
    restore = PartitionRestore(shard=1, cut=10**9)
    records = random_changelog(seed=7, cut=10**9)
    restore.add_many(records)
    state, _ = restore.rows(2, 3)
    latest = restore.latest
    assert state.keys and all(shard == 1 for shard, _ in state.keys)
    for i, (_, name) in enumerate(state.keys):
        value = latest[name][1]
        _, _, _, _, steps, offset, time, _ = changelog.HEADER.unpack_from(value)
        h, c = np.frombuffer(value, "<f4", offset=changelog.HEADER.size).reshape(2, 2, 3)
        assert np.array_equal(state.h[:, i], h) and np.array_equal(state.c[:, i], c)
        assert (state.steps[i], state.offsets[i], state.times[i]) == (steps, offset, time)


def test_encoding_in_chunks_gives_each_row_the_value_it_gets_alone(monkeypatch):
    rng = np.random.default_rng(3)
    n = 10
    rows = Rows([(0, f"k{i}") for i in range(n)], rng.standard_normal((2, n, 3), dtype=np.float32),
                rng.standard_normal((2, n, 3), dtype=np.float32), np.arange(n) + 1, np.arange(n) * 7, np.arange(n) * 11)
    alone = [changelog.encode(Rows([rows.keys[i]], rows.h[:, i:i + 1], rows.c[:, i:i + 1], rows.steps[i:i + 1],
                                   rows.offsets[i:i + 1], rows.times[i:i + 1]), "v1")[0] for i in range(n)]
    monkeypatch.setattr(changelog, "ENCODE_CHUNK", 3)
    assert changelog.encode(rows, "v1") == alone


def test_the_primary_adopts_a_promoted_shadows_state_where_its_own_changelog_lacks_the_served_version():
    """After a promotion the primary's changelog holds the shadow's state only once a checkpoint wrote
    it there; until then (a crash), and for a partition from a pod that has not promoted, the newest
    record of the served version may be in the shadow's. A key takes the shadow's record when it is
    newer, or as new and the primary's is another version's; the keys taken are returned."""
    def fold(records):
        restore = PartitionRestore(shard=0, cut=100)
        for key, offset, version, hidden in records:
            restore.add(key.encode(), changelog.encode(rows_of([(0, key)], [offset], hidden=hidden), version)[0], [])
        return restore

    primary = fold([("same", 5, "v1", 3), ("copied", 5, "v2", 4), ("newer", 9, "v1", 3), ("dropped", 2, "v1", 3)])
    primary.add(b"dropped", None, changelog.tombstone_headers(8))
    shadow = fold([("same", 5, "v2", 4), ("copied", 5, "v2", 4), ("only", 7, "v2", 4), ("newer", 3, "v2", 4),
                   ("dropped", 6, "v2", 4), ("other", 6, "v3", 4)])
    assert sorted(primary.adopt(shadow, "v2")) == ["only", "same"]
    state, incompatible = primary.rows(2, 4, "v2")
    assert [key for _, key in state.keys] == ["same", "copied", "only"] and incompatible == 1  # "newer": v1's
    assert state.offsets.tolist() == [5, 5, 7]
