"""The state table and the streaming predictor, without Kafka."""

import random

import numpy as np
import torch

from streamlstm.artifact import load_artifact
from streamlstm.events import Event
from streamlstm.offline import score_events
from streamlstm.predictor import StreamingPredictor, step_rounds
from streamlstm.state import StateTable

CPU = torch.device("cpu")


def test_new_keys_start_at_zero_and_rows_are_stable_across_growth():
    table = StateTable(num_layers=2, hidden_size=4, device=CPU, capacity=2)
    rows = table.rows(["a", "b"])
    table.scatter(rows, torch.ones(2, 2, 4), torch.ones(2, 2, 4))
    more = table.rows(["c", "d", "e", "a"])  # grows twice
    assert len(table) == 5 and more[-1] == rows[0]
    h, c = table.gather(more)
    assert h[:, :3].abs().sum() == 0 and c[:, :3].abs().sum() == 0
    assert torch.equal(h[:, 3], torch.ones(2, 4))


def test_a_dropped_key_comes_back_zeroed():
    table = StateTable(num_layers=1, hidden_size=3, device=CPU, capacity=4)
    rows = table.rows(["a"])
    assert table.scatter(rows, torch.ones(1, 1, 3), torch.ones(1, 1, 3)).tolist() == [1]
    table.drop(["a"])
    h, _ = table.gather(table.rows(["a"]))
    assert h.abs().sum() == 0 and len(table) == 1


def test_a_key_repeated_in_a_poll_advances_once_per_step_in_order():
    rounds = step_rounds(["a", "b", "a", "c", "a", "b"])
    assert [r.tolist() for r in rounds] == [[0, 1, 3], [2, 5], [4]]
    assert all(len(set(np.array(["a", "b", "a", "c", "a", "b"])[r])) == len(r) for r in rounds)


def test_streaming_in_random_polls_equals_offline_whole_sequences(model_dir):
    artifact = load_artifact(model_dir)
    rng = random.Random(7)
    events = [Event(f"k{rng.randrange(40)}", [rng.gauss(10, 3), rng.gauss(20, 5), rng.randrange(24)], None)
              for _ in range(2000)]
    predictor = StreamingPredictor(artifact, CPU)
    outputs, steps, i = [], [], 0
    while i < len(events):
        chunk = events[i : i + rng.randrange(1, 300)]
        i += len(chunk)
        p, s = predictor.advance([e.key for e in chunk], [e.features for e in chunk])
        outputs.append(p)
        steps.append(s)
    expected, expected_steps = score_events(artifact, events)
    np.testing.assert_allclose(np.concatenate(outputs), expected, atol=1e-5, rtol=0)
    assert np.array_equal(np.concatenate(steps), expected_steps)
