"""The state table and the streaming predictor, without Kafka."""

import itertools
import random

import numpy as np
import torch

from streamlstm.events import FLOAT32_MAX, Event, EventDecoder, Rejection
from streamlstm.model.artifact import load_artifact
from streamlstm.model.predictor import StreamingPredictor, step_rounds
from streamlstm.state.table import StateTable
from streamlstm.training.reference import score_events

CPU = torch.device("cpu")


def test_new_keys_start_at_zero_and_rows_are_stable_across_growth():
    table = StateTable(num_layers=2, hidden_size=4, device=CPU, capacity=2)
    rows = table.rows([(0, "a"), (0, "b")])
    table.scatter(rows, torch.ones(2, 2, 4), torch.ones(2, 2, 4))
    more = table.rows([(0, "c"), (1, "d"), (1, "e"), (0, "a")])  # grows twice
    assert len(table) == 5 and more[-1] == rows[0]
    h, c = table.gather(more)
    assert h[:, :3].abs().sum() == 0 and c[:, :3].abs().sum() == 0
    assert torch.equal(h[:, 3], torch.ones(2, 4))


def test_a_dropped_key_comes_back_zeroed_and_its_tombstone_precedes_its_new_state():
    table = StateTable(num_layers=1, hidden_size=3, device=CPU, capacity=4)
    rows = table.rows([(0, "a")])
    assert table.scatter(rows, torch.ones(1, 1, 3), torch.ones(1, 1, 3)).tolist() == [1]
    table.drop([(0, "a")], [7])
    rows = table.rows([(0, "a")])
    h, _ = table.gather(rows)
    assert h.abs().sum() == 0 and len(table) == 1
    table.scatter(rows, torch.ones(1, 1, 3), torch.ones(1, 1, 3))
    changes = table.take_changes()
    assert changes.dropped == [((0, "a"), 7)] and changes.changed.keys == [(0, "a")]
    assert changes.changed.steps.tolist() == [1]
    empty = table.take_changes()
    assert empty.dropped == [] and empty.changed.keys == []


def test_forgetting_a_shard_removes_its_keys_without_tombstones():
    table = StateTable(num_layers=1, hidden_size=2, device=CPU, capacity=2)
    rows = table.rows([(0, "a"), (1, "a"), (1, "b")])
    table.scatter(rows, torch.ones(1, 3, 2), torch.ones(1, 3, 2))
    table.drop([(1, "b")], [3])
    assert table.forget_shard(1) == 1
    changes = table.take_changes()
    assert changes.dropped == [] and changes.changed.keys == [(0, "a")]
    assert table.row((1, "a")) is None and table.row((0, "a")) is not None


def test_keys_idle_past_their_shards_cutoff_expire_with_a_tombstone_at_their_last_offset():
    table = StateTable(num_layers=1, hidden_size=2, device=CPU)
    rows = table.rows([(0, "old"), (0, "new"), (1, "old")])
    table.stamp(rows.numpy(), np.array([10, 11, 12]), np.array([1_000, 9_000, 1_000]))
    table.take_changes()
    assert table.latest_time(0) == 9_000 and table.live_shards() == [0, 1]
    assert table.expire({0: 5_000}) == [(0, "old")]
    assert table.take_changes().dropped == [((0, "old"), 10)]
    assert len(table) == 2


def test_a_key_repeated_in_a_poll_advances_once_per_step_in_order():
    rows = np.array([7, 2, 7, 9, 7, 2])  # the table rows of keys a, b, a, c, a, b
    rounds = step_rounds(rows)
    assert [r.tolist() for r in rounds] == [[0, 1, 3], [2, 5], [4]]
    assert [r.tolist() for r in step_rounds(np.array([4, 1, 3]))] == [[0, 1, 2]]  # all distinct: one step


def test_step_rounds_put_each_rows_events_in_successive_steps_in_order():
    rng = np.random.default_rng(3)
    for _ in range(200):
        rows = rng.integers(0, rng.integers(1, 12), rng.integers(1, 40))
        rounds = step_rounds(rows)
        assert sorted(np.concatenate(rounds).tolist()) == list(range(len(rows)))  # every event once
        assert all(len(set(rows[r].tolist())) == len(r) and (np.diff(r) > 0).all() for r in rounds)
        for row in set(rows.tolist()):  # a row's k-th event is in step k
            mine = [int(r[rows[r] == row][0]) for r in rounds if (rows[r] == row).any()]
            assert mine == np.flatnonzero(rows == row).tolist()


def test_streaming_in_random_polls_equals_offline_whole_sequences_with_resets(model_dir):
    artifact = load_artifact(model_dir)
    rng = random.Random(7)
    events = [Event(f"k{rng.randrange(40)}", [rng.gauss(10, 3), rng.gauss(20, 5), rng.randrange(24)], None,
                    reset=rng.random() < 0.01)
              for _ in range(2000)]
    predictor = StreamingPredictor(artifact, CPU)
    outputs, steps, i = [], [], 0
    while i < len(events):
        chunk = events[i : i + rng.randrange(1, 300)]
        i += len(chunk)
        result = predictor.advance([(0, e.key) for e in chunk], [e.features for e in chunk],
                                   np.array([e.reset for e in chunk]))
        outputs.append(result.predictions)
        steps.append(result.steps)
    expected, expected_steps = score_events(artifact, events)
    np.testing.assert_allclose(np.concatenate(outputs), expected, atol=1e-5, rtol=0)
    assert np.array_equal(np.concatenate(steps), expected_steps)


def amplified(model_dir):
    """The test model with input weights x1000 (row sums of |W_ih| up to ~660)."""
    artifact = load_artifact(model_dir, CPU)
    with torch.no_grad():
        artifact.model.lstm.weight_ih_l0.mul_(1000)
    return artifact


def test_no_event_the_decoder_accepts_can_make_a_keys_state_non_finite(model_dir):
    """Input weights above 1 turned a feature at float32's maximum (a "no data" sentinel) into gates of
    inf - inf = NaN, and the key's state into NaN for good. The model's feature limits keep every step
    finite: at every corner of the limits, from zero and from states the corners saturated."""
    sentinel = [FLOAT32_MAX, -FLOAT32_MAX, FLOAT32_MAX]
    unguarded = StreamingPredictor(amplified(model_dir), CPU)
    assert not np.isfinite(unguarded.advance([(0, "k")], [sentinel]).predictions).all()

    artifact = amplified(model_dir)
    limits = artifact.model.feature_limits()
    decoder = EventDecoder(artifact.spec.features, limits=limits)
    assert isinstance(decoder.decode(b"k", b'{"features": %r}' % sentinel), Rejection)
    corners = [list(c) for c in itertools.product(*limits)]
    keys = [(0, f"corner-{i}") for i in range(len(corners))]
    predictor = StreamingPredictor(artifact, CPU)
    for features in (corners, corners[::-1], corners):
        events = [decoder.decode(b"k", b'{"features": %r}' % f) for f in features]
        assert all(isinstance(e, Event) for e in events)
        for key, event in zip(keys, events):  # one key a step: another matmul kernel than a batch's
            assert np.isfinite(predictor.advance([key], [event.features]).predictions).all()
        assert np.isfinite(predictor.advance(keys, [e.features for e in events]).predictions).all()
    h, c = predictor.table.gather(predictor.table.rows(keys))
    assert torch.isfinite(h).all() and torch.isfinite(c).all()


def test_advance_returns_each_steps_batch_size_and_time(model_dir):
    predictor = StreamingPredictor(load_artifact(model_dir), CPU)
    keys = [(0, "a"), (0, "b"), (0, "a"), (0, "c"), (0, "a")]
    result = predictor.advance(keys, [[10.0, 20.0, 12.0]] * len(keys))
    assert [size for size, _ in result.step_stats] == [3, 1, 1]
    assert all(seconds >= 0 for _, seconds in result.step_stats)
    assert not hasattr(predictor, "step_stats")


def poison_scratch_row(table: StateTable) -> None:
    """What a fixed-size step's padding may leave in the scratch row."""
    for buffer in table.padded_storage():
        buffer[:, table.scratch_row] = float("nan")


def test_the_scratch_row_is_past_every_key_and_moves_to_the_new_capacity_on_growth():
    table = StateTable(num_layers=2, hidden_size=3, device=CPU, capacity=2)
    seen = set()
    for capacity in (2, 4, 8, 16):
        padded_h, padded_c = table.padded_storage()
        assert table.scratch_row == capacity == table.h.shape[1] == table.c.shape[1]
        assert padded_h.shape == padded_c.shape == (2, capacity + 1, 3)
        assert table.h.data_ptr() == padded_h.data_ptr() and table.c.data_ptr() == padded_c.data_ptr()
        poison_scratch_row(table)
        rows = table.rows([(0, f"k{i}") for i in range(len(seen), capacity)]).tolist()
        assert all(row < capacity for row in rows) and not seen & set(rows)
        seen.update(rows)
        more = table.rows([(0, f"k{capacity}")])  # grows: the old scratch row becomes a key's row
        assert more.item() == capacity and table.scratch_row == 2 * capacity
        h, c = table.gather(more)
        assert h.abs().sum() == 0 and c.abs().sum() == 0  # the key starts at zero, not with the padding's
        seen.add(capacity)


def test_the_storage_generation_changes_exactly_when_h_and_c_are_reallocated():
    table = StateTable(num_layers=1, hidden_size=2, device=CPU, capacity=4)
    generation = table.storage_generation
    padded = table.padded_storage()

    def reallocated() -> bool:
        nonlocal generation, padded
        now = table.padded_storage()
        changed = table.storage_generation != generation
        assert changed == (now[0].data_ptr() != padded[0].data_ptr())
        assert table.storage_generation - generation in (0, 1)
        generation, padded = table.storage_generation, now
        return changed

    rows = table.rows([(0, "a"), (0, "b"), (1, "c"), (1, "d")])
    table.scatter(rows, torch.ones(1, 4, 2), torch.ones(1, 4, 2))
    table.reset([int(rows[0])])
    table.stamp(rows.numpy(), np.arange(4), np.arange(4))
    table.drop([(0, "a")], [5])
    table.expire({0: 2})
    table.forget_shard(1)
    table.take_changes()
    table.restart(1, 2)  # the same shape: the same buffers
    assert not reallocated()
    table.rows([(0, f"k{i}") for i in range(5)])  # past the capacity of 4
    assert reallocated()
    restored = table.export([table.row((0, f"k{i}")) for i in range(3)])
    restored.keys = [(2, f"k{i}") for i in range(3)]
    table.load(restored)  # 8 keys in 8 rows
    assert not reallocated()
    restored.keys = [(3, f"k{i}") for i in range(3)]
    table.load(restored)  # 11 keys: grows once, doubling (a restore loads partition after partition)
    assert reallocated() and table.scratch_row == 16
    table.restart(3, 2)  # another shape
    assert reallocated() and table.h.shape == (3, 16, 2) and table.scratch_row == 16 and len(table) == 0


def test_state_exported_and_loaded_is_unaffected_by_the_scratch_row():
    gen = torch.Generator().manual_seed(0)
    table = StateTable(num_layers=2, hidden_size=3, device=CPU, capacity=2)
    keys = [(i % 2, f"k{i}") for i in range(5)]
    rows = table.rows(keys)
    h, c = torch.randn(2, 5, 3, generator=gen), torch.randn(2, 5, 3, generator=gen)
    table.scatter(rows, h, c)
    table.stamp(rows.numpy(), np.arange(5), np.arange(5) * 10)
    poison_scratch_row(table)
    changes = table.take_changes()
    assert changes.changed.keys == keys
    assert np.array_equal(changes.changed.h, h.numpy()) and np.array_equal(changes.changed.c, c.numpy())

    other = StateTable(num_layers=2, hidden_size=3, device=CPU, capacity=1)
    poison_scratch_row(other)
    other.load(changes.changed)
    poison_scratch_row(other)
    again = other.export([other.row(k) for k in keys])
    assert again.keys == keys and np.array_equal(again.h, h.numpy()) and np.array_equal(again.c, c.numpy())
    assert again.steps.tolist() == [1] * 5 and again.offsets.tolist() == list(range(5))
    assert torch.isfinite(other.h).all() and torch.isfinite(other.c).all()
    table.scatter(table.rows(keys[1:3]), torch.zeros(2, 2, 3), torch.zeros(2, 2, 3))
    other.load(table.export([table.row(k) for k in keys[1:3]]))  # two keys it holds: replaced, not added
    assert len(other) == 5 and not other.export([other.row(keys[1])]).h.any()


def test_the_eager_step_never_reads_the_scratch_row(model_dir):
    """Garbage in the scratch row (a graph's padding writes it) changes no prediction, growth included."""
    artifact = load_artifact(model_dir)
    clean = StreamingPredictor(artifact, CPU, table=StateTable(2, 16, CPU, capacity=4))
    poisoned = StreamingPredictor(artifact, CPU, table=StateTable(2, 16, CPU, capacity=4))
    rng = random.Random(1)
    for _ in range(6):
        keys = [(0, f"k{rng.randrange(30)}") for _ in range(rng.randrange(1, 20))]
        features = [[rng.gauss(10, 3), rng.gauss(20, 5), rng.randrange(24)] for _ in keys]
        poison_scratch_row(poisoned.table)
        a, b = clean.advance(keys, features), poisoned.advance(keys, features)
        assert np.array_equal(a.predictions, b.predictions) and np.array_equal(a.steps, b.steps)
    assert poisoned.table.scratch_row > 4
