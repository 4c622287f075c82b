"""streamlstm.StatefulLSTM, the library API: the daemon's batched per-key step without Kafka, equal to the
offline reference (`streamlstm predict`'s) within 1e-5."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import streamlstm
from streamlstm.events import Event
from streamlstm.model.artifact import load_artifact
from streamlstm.training.reference import score_events


def events(n: int, keys: int, seed: int) -> list[Event]:
    rng = random.Random(seed)
    return [Event(f"k{rng.randrange(keys)}", [rng.gauss(10, 3), rng.gauss(20, 5), rng.randrange(24)], None)
            for _ in range(n)]


def test_calls_with_repeated_keys_equal_the_offline_reference(model_dir):
    lstm = streamlstm.StatefulLSTM(model_dir, device="cpu")
    stream = events(1_500, 20, seed=1)
    rng = random.Random(2)
    out, i = [], 0
    while i < len(stream):
        chunk = stream[i:i + rng.randrange(1, 120)]  # keys repeat within a call: they advance in order
        i += len(chunk)
        out.append(lstm.step([e.key for e in chunk], [e.features for e in chunk]))
    expected, _ = score_events(load_artifact(model_dir), stream)
    np.testing.assert_allclose(np.concatenate(out), expected, atol=1e-5, rtol=0)
    assert len(lstm) == 20 and lstm.outputs == ("load",) and lstm.version == load_artifact(model_dir).version


def test_reset_zeroes_a_key_and_drop_forgets_it_as_the_daemons_reset_and_end_do(model_dir):
    lstm = streamlstm.StatefulLSTM(model_dir, device="cpu")
    first, second = events(30, 3, seed=3), events(30, 3, seed=4)
    lstm.step([e.key for e in first], [e.features for e in first])
    lstm.reset("k0")
    state = lstm.state("k0")
    assert state is not None and state.steps == 0 and not state.h.any() and not state.c.any()
    lstm.drop("k1")
    assert lstm.state("k1") is None and len(lstm) == 2
    got = lstm.step([e.key for e in second], [e.features for e in second])
    # offline: k0 and k1 start over at their first event after the reset and the drop; k2 carries on
    starting_over = {"k0", "k1"}
    restart = []
    for e in second:
        restart.append(Event(e.key, e.features, None, reset=e.key in starting_over))
        starting_over.discard(e.key)
    expected, _ = score_events(load_artifact(model_dir), first + restart)
    np.testing.assert_allclose(got, expected[len(first):], atol=1e-5, rtol=0)
    assert lstm.state("k2").steps == sum(e.key == "k2" for e in first + second)


def test_state_is_the_offline_models_final_h_and_c(model_dir):
    lstm = streamlstm.StatefulLSTM(model_dir, device="cpu")
    stream = events(40, 1, seed=5)
    lstm.step([e.key for e in stream], [e.features for e in stream])
    model = load_artifact(model_dir).model
    with torch.no_grad():
        _, (h, c) = model.run(torch.tensor([[e.features for e in stream]], dtype=torch.float32))
    state = lstm.state("k0")
    assert state is not None and state.steps == 40
    np.testing.assert_allclose(state.h, h[:, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(state.c, c[:, 0].numpy(), atol=1e-5)


def test_an_event_the_daemon_would_reject_raises_and_advances_no_key(model_dir):
    lstm = streamlstm.StatefulLSTM(model_dir, device="cpu")
    lstm.step(["a"], [[1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match=r"event 1 \(key 'b'\) is not valid: wrong_feature_count"):
        lstm.step(["a", "b"], [[1.0, 2.0, 3.0], [1.0]])
    with pytest.raises(ValueError, match="non_finite_feature"):
        lstm.step(["a"], [{"load": float("nan"), "temp": 1.0, "hour": 2.0}])
    assert lstm.state("a").steps == 1 and lstm.state("b") is None
    named = lstm.step(["a"], [{"hour": 3.0, "temp": 2.0, "load": 1.0}])  # by name, any order
    assert named.shape == (1, 1)
