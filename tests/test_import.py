"""`streamlstm import`: the tutorials' LSTMModel, trained in its own plain PyTorch loop and saved as a
state_dict (torch.save, or safetensors), served by the daemon; each prediction equals the plain model's
forward over the key's events so far. What cannot be served one event at a time is refused, exit code 2."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import streamlstm
from conftest import produce
from streamlstm.cli import main
from test_durable_state import predictions_by_source, prepare


class LSTMModel(nn.Module):
    """As the tutorials write it: nn.LSTM(batch_first=True) and a Linear on the last step's output."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, output_size: int, **lstm: object) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True, **lstm)
        self.fc = nn.Linear(hidden_size * (2 if lstm.get("bidirectional") else 1), output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1, :])


def trained_model() -> LSTMModel:
    """A few steps of the tutorials' loop: windows of a noisy sine, the next value as the target."""
    torch.manual_seed(0)
    model = LSTMModel(2, 12, 2, 1)
    t = torch.arange(0, 400, dtype=torch.float32)
    series = torch.stack([torch.sin(t / 7), torch.cos(t / 11)], dim=1) + 0.05 * torch.randn(400, 2)
    x = torch.stack([series[i:i + 20] for i in range(300)])
    y = series[20:320, :1]
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(30):
        optimiser.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimiser.step()
    return model.eval()


def prefix_forward(model: LSTMModel, features: list[list[float]]) -> np.ndarray:
    """The plain model's forward over each prefix of one key's events: its prediction after each."""
    with torch.no_grad():
        x = torch.tensor([features], dtype=torch.float32)
        return np.concatenate([model(x[:, :t]).numpy() for t in range(1, len(features) + 1)])


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    model = trained_model()
    where = tmp_path_factory.mktemp("plain")
    torch.save(model.state_dict(), where / "model.pt")
    save_file(model.state_dict(), where / "model.safetensors")
    return model, where


def run(*args: str) -> int:
    return main(["import", *map(str, args)])


@pytest.mark.parametrize("weights", ["model.pt", "model.safetensors"])
def test_an_imported_model_steps_as_the_plain_models_forward_over_each_prefix(plain, tmp_path, weights, capsys):
    model, where = plain
    assert run("--weights", where / weights, "--out", tmp_path / "m", "--features", "s,c") == 0
    assert json.loads(capsys.readouterr().out)["model"] == str(tmp_path / "m")
    lstm = streamlstm.StatefulLSTM(tmp_path / "m", device="cpu")
    rng = random.Random(1)
    series = {k: [[rng.uniform(-1, 1), rng.uniform(-1, 1)] for _ in range(25)] for k in ("a", "b", "c")}
    order = [k for k in series for _ in range(25)]
    rng.shuffle(order)
    seen = {k: 0 for k in series}
    got = {k: [] for k in series}
    for key in order:
        got[key].append(lstm.step([key], [series[key][seen[key]]])[0])
        seen[key] += 1
    for key, features in series.items():
        np.testing.assert_allclose(np.array(got[key]), prefix_forward(model, features), atol=1e-5, rtol=0)


def test_a_daemon_serves_the_imported_model_as_its_plain_forward(plain, tmp_path, broker, daemon_factory, capsys):
    model, where = plain
    for weights, out in (("model.pt", "m"), ("model.safetensors", "m2")):  # saved both ways: one model
        assert run("--weights", where / weights, "--out", tmp_path / out, "--features", "s,c", "--outputs", "s") == 0
    versions = [json.loads(line)["version"] for line in capsys.readouterr().out.splitlines()]
    assert len(versions) == 2 and versions[0] == versions[1]
    daemon = daemon_factory(tmp_path / "m")
    prepare(daemon)
    daemon.start()
    rng = random.Random(2)
    events = [(f"k{i % 5}", [round(rng.uniform(-1, 1), 4), round(rng.uniform(-1, 1), 4)], 1_700_000_000_000 + i)
              for i in range(200)]
    produce(broker, daemon.topic, [(k.encode(), json.dumps({"features": {"s": f[0], "c": f[1]}, "ts": ts}).encode())
                                   for k, f, ts in events])
    found = predictions_by_source(broker, daemon.kafka["output_topic"], len(events))
    assert daemon.stop() == 0
    for key in {k for k, _, _ in events}:
        mine = [(f, ts) for k, f, ts in events if k == key]
        expected = prefix_forward(model, [f for f, _ in mine])
        published = np.array([found[ts][0]["prediction"] for _, ts in mine])
        np.testing.assert_allclose(published, expected, atol=1e-5, rtol=0)


def refused(tmp_path, capsys, state: dict, *extra: str) -> str:
    torch.save(state, tmp_path / "w.pt")
    assert run("--weights", tmp_path / "w.pt", "--out", tmp_path / "m", "--features", "s,c", *extra) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamlstm import: ")
    assert not (tmp_path / "m").exists()
    return lines[0]


def test_weights_that_are_not_a_servable_lstm_with_a_linear_head_are_refused_with_the_reason(tmp_path, capsys):
    plain = LSTMModel(2, 8, 1, 1).state_dict()
    assert "bidirectional" in refused(tmp_path, capsys, LSTMModel(2, 8, 1, 1, bidirectional=True).state_dict())
    assert "projected" in refused(tmp_path, capsys, LSTMModel(2, 8, 1, 1, proj_size=4).state_dict() | {
        "fc.weight": torch.zeros(1, 4)})
    assert "no LSTM parameters" in refused(tmp_path, capsys, nn.Linear(2, 1).state_dict())
    assert "no linear head" in refused(tmp_path, capsys, {k: v for k, v in plain.items() if k.startswith("lstm.")})
    assert "the LSTM takes 2 inputs" in refused(tmp_path, capsys, plain, "--features", "a,b,c")
    bad = dict(plain, **{"fc.weight": torch.zeros(1, 5)})
    assert "the head takes 5 inputs" in refused(tmp_path, capsys, bad)
    assert "--outputs names 2 outputs" in refused(tmp_path, capsys, plain, "--outputs", "x,y")


def test_a_pickled_model_object_is_not_unpickled(tmp_path, capsys):
    torch.save(LSTMModel(2, 8, 1, 1), tmp_path / "whole.pt")  # the object, not its state_dict
    assert run("--weights", tmp_path / "whole.pt", "--out", tmp_path / "m", "--features", "s,c") == 2
    assert "weights_only" in capsys.readouterr().err


def test_batch_first_false_and_a_prefixed_module_import_the_same_model(tmp_path, capsys):
    torch.manual_seed(3)
    first, second = nn.LSTM(2, 6, batch_first=True), nn.LSTM(2, 6, batch_first=False)
    second.load_state_dict(first.state_dict())  # the flag is not in the weights
    head = nn.Linear(6, 1)
    for name, lstm in (("a", first), ("b", second)):
        torch.save({**{f"lstm.{k}": v for k, v in lstm.state_dict().items()},
                    **{f"fc.{k}": v for k, v in head.state_dict().items()}}, tmp_path / f"{name}.pt")
        assert run("--weights", tmp_path / f"{name}.pt", "--out", tmp_path / name, "--features", "s,c") == 0
    wrapped = {f"model.{k}": v for k, v in torch.load(tmp_path / "a.pt", weights_only=True).items()}
    torch.save(wrapped, tmp_path / "wrapped.pt")  # the tutorial's module inside another: --prefix
    assert run("--weights", tmp_path / "wrapped.pt", "--out", tmp_path / "c", "--features", "s,c", "--prefix", "model.") == 0
    capsys.readouterr()
    a, b, c = (streamlstm.StatefulLSTM(tmp_path / n, device="cpu") for n in "abc")
    assert a.version == b.version == c.version
