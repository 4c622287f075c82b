"""The changelog record format and the restore rule, without Kafka."""

import numpy as np
import torch

from streamlstm.state import changelog
from streamlstm.state.changelog import PartitionRestore
from streamlstm.state.table import Rows, StateTable

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
