"""Trainer tests on small synthetic data: it learns, it is reproducible, and it does not look ahead."""

from __future__ import annotations

import csv
import io
import json
import math
import random
import re
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import produce, unique, wait_until

from streamlstm.config import KafkaConfig, TrainConfig
from streamlstm.events import EventDecoder, decode_line, read_event_lines
from streamlstm.model.artifact import load_artifact
from streamlstm.model.network import LSTMForecaster
from streamlstm.training.checkpoint import History, TrainingCheckpoint
from streamlstm.training.data import class_names, feature_names
from streamlstm.training.reference import score_events
from streamlstm.training.train import TrainingDiverged, checkpoint_path, train
from streamlstm.transport.admin import ensure_topics

SMALL = TrainConfig(hidden_size=12, num_layers=1, epochs=25, learning_rate=0.02, batch_keys=16, holdout_events=8)


def sine_records(keys: int = 40, steps: int = 60, seed: int = 1) -> list[dict]:
    """Noisy sine waves with a random phase per key, interleaved by time like a live stream."""
    rng = random.Random(seed)
    phases = [rng.uniform(0, 2 * math.pi) for _ in range(keys)]
    return [
        {"key": f"k{k}", "features": {"y": math.sin(0.5 * t + phases[k]) + rng.gauss(0, 0.05), "t": t % 4}, "ts": t}
        for t in range(steps)
        for k in range(keys)
    ]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def sine_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("sine") / "events.jsonl", sine_records())


@pytest.fixture(scope="module")
def sine_model(sine_file: Path, tmp_path_factory: pytest.TempPathFactory):
    return train(sine_file, tmp_path_factory.mktemp("model") / "m", SMALL, log=quiet)


def test_trained_model_beats_the_naive_forecast(sine_model) -> None:
    t = sine_model.training
    assert sine_model.spec.outputs == ("y",)
    assert sine_model.spec.features == ("y", "t")
    assert t["events"] == 2400 and t["keys"] == 40 and t["rejected"] == 0
    assert t["validation_targets"] == 40 * 8 and t["train_targets"] == 40 * (59 - 8)
    assert t["val_mae"] < 0.5 * t["naive_mae"], t
    assert t["val_rmse"] < 0.5 * t["naive_rmse"], t


def test_metrics_are_those_of_the_offline_reference(sine_model, sine_file: Path) -> None:
    """val_mae recomputed from score_events over the file agrees with the stored figure."""
    decoder = EventDecoder(sine_model.spec.features)
    events = [decode_line(decoder, obj) for _, obj in read_event_lines(sine_file)]
    predictions, _ = score_events(sine_model, events)
    errors = []
    by_key: dict[str, list[int]] = {}
    for i, e in enumerate(events):
        by_key.setdefault(e.key, []).append(i)
    for positions in by_key.values():
        for i, j in zip(positions[-9:-1], positions[-8:], strict=True):
            errors.append(abs(predictions[i][0] - events[j].features[0]))
    assert len(errors) == sine_model.training["validation_targets"]
    assert np.mean(errors) == pytest.approx(sine_model.training["val_mae"], rel=1e-5)


def test_same_seed_same_version_other_seed_other_version(sine_model, sine_file: Path, tmp_path: Path) -> None:
    again = train(sine_file, tmp_path / "again", SMALL, log=quiet)
    assert again.version == sine_model.version
    assert again.training == sine_model.training
    weights = "model.safetensors"
    assert (tmp_path / "again" / weights).read_bytes() == (sine_model.path / weights).read_bytes()
    other = train(sine_file, tmp_path / "other", replace(SMALL, seed=1), log=quiet)
    assert other.version != sine_model.version


def test_result_ignores_global_torch_state_and_restores_threads(sine_file: Path, tmp_path: Path) -> None:
    """The caller's global RNG and thread count neither change the weights nor get changed for good."""
    threads = torch.get_num_threads()
    cfg = replace(SMALL, epochs=2)
    torch.manual_seed(1)
    first = train(sine_file, tmp_path / "a", cfg, log=quiet)
    torch.manual_seed(2)
    torch.set_num_threads(2 if threads == 1 else 1)
    try:
        second = train(sine_file, tmp_path / "b", cfg, log=quiet)
        assert torch.get_num_threads() == (2 if threads == 1 else 1)
    finally:
        torch.set_num_threads(threads)
    assert first.version == second.version and first.training == second.training


def test_normalisation_ignores_the_holdout(tmp_path: Path) -> None:
    """Holdout values a thousand times larger than the rest leave every statistic unchanged."""
    records = [{"key": k, "features": [float(t % 5 + i)]} for t in range(20) for i, k in enumerate("abc")]
    spiked = [
        {"key": r["key"], "features": [r["features"][0] * 1000]} if n >= len(records) - 3 * 8 else r
        for n, r in enumerate(records)
    ]
    cfg = replace(SMALL, epochs=1)
    plain = train(write_jsonl(tmp_path / "plain.jsonl", records), tmp_path / "plain", cfg, log=quiet).spec
    spike = train(write_jsonl(tmp_path / "spike.jsonl", spiked), tmp_path / "spike", cfg, log=quiet).spec
    assert spike.features == ("f0",)
    train_part = np.array([float(t % 5 + i) for t in range(20 - 8 - 1) for i in range(3)])
    assert spike.feature_mean == pytest.approx((train_part.mean(),))
    assert spike.feature_std == pytest.approx((train_part.std(),))
    assert (spike.feature_mean, spike.feature_std) == (plain.feature_mean, plain.feature_std)
    assert (spike.target_mean, spike.target_std) == (plain.target_mean, plain.target_std)


def test_rejected_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    records = sine_records(keys=4, steps=20)
    records[5:5] = ["not json", {"key": "x", "features": {"y": "nan?", "t": 0}}, {"key": "", "features": [1, 2]},
                    {"key": "x", "features": {"y": 1.0, "t": 0}, "extra": 1}]
    logged: list[str] = []
    data = write_jsonl(tmp_path / "e.jsonl", records)
    artifact = train(data, tmp_path / "m", replace(SMALL, epochs=1), log=logged.append)
    assert artifact.training["rejected"] == 4 and artifact.training["events"] == 80
    assert any("skipped 4 rejected events" in line for line in logged)


def test_regression_targets_pick_the_output_feature(sine_file: Path, tmp_path: Path) -> None:
    artifact = train(sine_file, tmp_path / "m", replace(SMALL, epochs=1, targets=["t"]), log=quiet)
    assert artifact.spec.outputs == ("t",)
    assert artifact.spec.target_mean == pytest.approx((1.5,), abs=0.1)
    with pytest.raises(ValueError, match="nope"):
        train(sine_file, tmp_path / "bad", replace(SMALL, epochs=1, targets=["nope"]), log=quiet)


def test_classification_learns_and_publishes_probabilities(tmp_path: Path) -> None:
    """Label = whether the wave is rising: unknowable from one value, learnable from the history."""
    records = sine_records(keys=30, steps=40)
    last: dict[str, float] = {}
    for r in records:
        y = r["features"]["y"]
        r["label"] = "up" if y > last.get(r["key"], y) else "down"
        last[r["key"]] = y
    artifact = train(write_jsonl(tmp_path / "c.jsonl", records), tmp_path / "m",
                     replace(SMALL, task="classification"), log=quiet)
    assert artifact.spec.outputs == ("down", "up")
    assert artifact.spec.target_mean == () and artifact.spec.target_std == ()
    t = artifact.training
    assert t["val_accuracy"] > t["majority_accuracy"] + 0.2, t
    assert t["val_log_loss"] < t["prior_log_loss"], t
    decoder = EventDecoder(artifact.spec.features)
    events = [decode_line(decoder, obj) for _, obj in read_event_lines(tmp_path / "c.jsonl")]
    probabilities, _ = score_events(artifact, events)
    assert probabilities.shape == (len(events), 2)
    assert np.all(probabilities >= 0)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert load_artifact(tmp_path / "m").version == artifact.version


def test_class_names_sort_numbers_numerically() -> None:
    assert class_names([10, 2, None, "b", 2, "a", -1]) == ("-1", "2", "10", "a", "b")


def test_feature_names_prefer_named_features() -> None:
    assert feature_names([{"features": [1, 2]}, {"features": {"b": 1, "a": 2}}]) == ("b", "a")
    assert feature_names(["junk", {"features": [1, 2, 3]}]) == ("f0", "f1", "f2")
    with pytest.raises(ValueError):
        feature_names([{"features": []}])


def test_train_and_predict_commands_hand_over_one_artifact(sine_file: Path, tmp_path: Path) -> None:
    """`streamlstm train` writes the artifact `streamlstm predict` scores, one line per event in file order."""
    import subprocess
    import sys

    out = tmp_path / "model"
    trained = subprocess.run(
        [sys.executable, "-m", "streamlstm", "train", "--data", str(sine_file), "--out", str(out),
         "--set", "train.epochs=2", "--set", "train.hidden_size=8"],
        capture_output=True, text=True, timeout=120, check=True)
    version = json.loads(trained.stdout)["version"]  # progress goes to stderr, the result to stdout
    assert load_artifact(out).version == version

    scored = subprocess.run(
        [sys.executable, "-m", "streamlstm", "predict", "--model", str(out), "--data", str(sine_file)],
        capture_output=True, text=True, timeout=120, check=True)
    lines = [json.loads(line) for line in scored.stdout.splitlines()]
    events = sine_file.read_text().splitlines()
    assert len(lines) == len(events) and [p["line"] for p in lines] == list(range(1, len(events) + 1))
    assert all(p["model_version"] == version and len(p["prediction"]) == 1 for p in lines)

    bad = subprocess.run(
        [sys.executable, "-m", "streamlstm", "train", "--data", str(sine_file), "--out", str(out),
         "--set", "train.epochs=many"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "train.epochs" in bad.stderr


def test_data_that_cannot_make_a_model_stops_train_with_exit_2(tmp_path: Path) -> None:
    """Two events per key leave nothing once train.holdout_events are held out: a message, no traceback."""
    import subprocess
    import sys

    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps({"key": f"k{i % 3}", "features": [i, 1.0]}) + "\n" for i in range(6)))
    result = subprocess.run([sys.executable, "-m", "streamlstm", "train", "--data", str(data), "--out",
                             str(tmp_path / "m")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "no training targets" in result.stderr and str(data) in result.stderr
    assert "Traceback" not in result.stderr


def small_sets(cfg: TrainConfig) -> list[str]:
    """`--set` arguments giving the command line the settings of `cfg`."""
    differing = {k: v for k, v in asdict(cfg).items() if v != getattr(TrainConfig(), k)}
    return [a for k, v in differing.items() for a in ("--set", f"train.{k}={json.dumps(v)}")]


def train_command(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamlstm", "train", *args], capture_output=True, text=True,
                          timeout=120, **kwargs)


def test_a_kafka_topic_trains_the_same_model_as_the_equivalent_file(broker, sine_file: Path, tmp_path: Path) -> None:
    cfg = replace(SMALL, epochs=3)
    topic = unique("history")
    ensure_topics(KafkaConfig(bootstrap_servers=broker.bootstrap, input_topic=topic, output_topic=f"{topic}-o",
                              dlq_topic=f"{topic}-d", topic_partitions=3))
    records = [json.loads(line) for line in sine_file.read_text().splitlines()]
    produce(broker, topic, [(r.pop("key").encode(), json.dumps(r).encode()) for r in records])
    result = train_command("--topic", topic, "--out", str(tmp_path / "k"), "--set",
                           f"kafka.bootstrap_servers={broker.bootstrap}", *small_sets(cfg), check=True)
    from_topic = json.loads(result.stdout)
    from_file = train(sine_file, tmp_path / "f", cfg, log=quiet)
    assert from_topic["version"] == from_file.version
    assert from_topic["training"] == json.loads(json.dumps(from_file.training))


def test_a_csv_file_trains_the_same_model_as_the_equivalent_jsonl(sine_file: Path, tmp_path: Path) -> None:
    """Rows in any order: each key's events are put in time order, as from JSONL."""
    records = [json.loads(line) for line in sine_file.read_text().splitlines()]
    rows = [[r["key"], r["ts"], r["features"]["y"], r["features"]["t"]] for r in records]
    random.Random(3).shuffle(rows)
    with open(tmp_path / "e.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["key", "ts", "y", "t"], *rows])
    cfg = replace(SMALL, epochs=2)
    assert train(tmp_path / "e.csv", tmp_path / "c", cfg, log=quiet).version == \
        train(sine_file, tmp_path / "j", cfg, log=quiet).version


def test_resume_after_a_kill_ends_as_an_uninterrupted_run(sine_file: Path, tmp_path: Path) -> None:
    """SIGKILL as soon as the first epoch's checkpoint exists; `--resume` continues to the same model."""
    cfg = replace(SMALL, epochs=30, patience=30)
    out = tmp_path / "m"
    args = [sys.executable, "-m", "streamlstm", "train", "--data", str(sine_file), "--out", str(out), *small_sets(cfg)]
    interrupted = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: checkpoint_path(out).exists() or interrupted.poll() is not None, 120, "a checkpoint")
    finally:
        interrupted.kill()
        interrupted.wait()
    assert not out.exists(), "the run finished before it could be interrupted"
    resumed = train_command(*args[4:], "--resume", check=True)
    epoch = int(re.search(r"resuming after epoch (\d+)", resumed.stderr).group(1))
    assert 1 <= epoch < cfg.epochs
    assert not checkpoint_path(out).exists()
    whole = train(sine_file, tmp_path / "whole", cfg, log=quiet)
    assert json.loads(resumed.stdout)["version"] == whole.version
    assert json.loads(resumed.stdout)["training"] == json.loads(json.dumps(whole.training))


def test_resume_refuses_a_checkpoint_it_cannot_continue(sine_file: Path, tmp_path: Path) -> None:
    """Another run's checkpoint, or a damaged one, stops `--resume` with exit 2 rather than mixing runs."""
    out = tmp_path / "m"
    model = torch.nn.Linear(1, 1)
    TrainingCheckpoint(checkpoint_path(out), "another run").save(model, torch.optim.Adam(model.parameters()), History())
    args = ("--data", str(sine_file), "--out", str(out), *small_sets(replace(SMALL, epochs=1)), "--resume")
    result = train_command(*args)
    assert result.returncode == 2 and "belongs to a run with other data" in result.stderr, result.stderr
    checkpoint_path(out).write_bytes(b"junk")
    result = train_command(*args)
    assert result.returncode == 2 and "is unreadable" in result.stderr, result.stderr


def test_a_progress_bar_shows_each_epoch_and_the_running_loss(sine_file: Path, tmp_path: Path) -> None:
    shown = io.StringIO()
    train(sine_file, tmp_path / "m", replace(SMALL, epochs=2), log=quiet, progress=shown)
    lines = shown.getvalue().split("\r")
    assert re.fullmatch(r"epoch 1/2 \[#+\.*\] 1/3 loss \d+\.\d{5}", lines[1]), lines[1]
    assert lines[-1].startswith("epoch 2/2 [" + "#" * 24 + "] 3/3 loss ") and shown.getvalue().endswith("\n")


def test_truncated_bptt_carries_the_state_across_chunks(sine_file: Path) -> None:
    """With the weights frozen (lr 0), the chunked training loss equals the loss of whole histories from
    zero state: each chunk starts where the previous one left h and c, as the daemon's state does."""
    from streamlstm.training.data import key_series, model_outputs, read_jsonl
    from streamlstm.training.train import build_spec, train_batch, training_batches

    cfg = replace(SMALL, tbptt_steps=7)
    data = read_jsonl(sine_file)
    outputs, _ = model_outputs(data, cfg)
    series = key_series(data, outputs, cfg)
    spec = build_spec(data, series, outputs, cfg)
    torch.manual_seed(0)
    model = LSTMForecaster(spec)
    (batch, *_) = training_batches(series, spec, cfg.batch_keys, np.random.default_rng(0))
    whole = torch.nn.functional.mse_loss(model(batch.inputs)[batch.mask], batch.targets[batch.mask]).item()
    total, count = train_batch(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, cfg)
    assert count == int(batch.mask.sum()) and total / count == pytest.approx(whole, rel=1e-5)


def test_training_that_diverges_writes_no_model(sine_file: Path, tmp_path: Path) -> None:
    """Weights gone to NaN would load and predict NaN for every event: training stops, naming the settings."""
    out = tmp_path / "m"
    with pytest.raises(TrainingDiverged, match="train.learning_rate"):
        train(sine_file, out, replace(SMALL, epochs=2, learning_rate=1e30, grad_clip=0.0), log=quiet)
    assert not out.exists()


def _history_with(good: dict, **fields) -> dict:
    return {**good, "history": {**good["history"], **fields}}


# What a damaged checkpoint can hold, from the good one's content and bytes: bytes are written as they are.
DAMAGED_CHECKPOINTS = {
    "empty": lambda good, raw: b"",
    "truncated": lambda good, raw: raw[:200],
    "not a mapping": lambda good, raw: [1, 2],
    "no optimiser state": lambda good, raw: {k: v for k, v in good.items() if k != "optimiser"},
    "no model weights": lambda good, raw: {k: v for k, v in good.items() if k != "model"},
    "history not a mapping": lambda good, raw: {**good, "history": 3},
    "history with unknown fields": lambda good, raw: {**good, "history": {"nope": 1}},
    "losses not numbers": lambda good, raw: _history_with(good, train_loss="a"),
    "best epoch beyond the epochs": lambda good, raw: _history_with(good, best_epoch=9),
    "best weights of another model": lambda good, raw: _history_with(good, best_weights={"x": torch.zeros(1)}),
    "weights of another model": lambda good, raw: {**good, "model": {"x": torch.zeros(1)}},
    "optimiser state malformed": lambda good, raw: {**good, "optimiser": 1},
    "optimiser of other parameters": lambda good, raw: {**good, "optimiser": {"state": {}, "param_groups": []}},
}


@pytest.mark.parametrize("damage", list(DAMAGED_CHECKPOINTS))
def test_a_damaged_checkpoint_is_a_usage_error_naming_the_file(tmp_path: Path, damage: str) -> None:
    """Any damage ends --resume with the file and what to do, not a KeyError or TypeError traceback."""
    from streamlstm.errors import UsageError
    from streamlstm.model.network import ModelSpec

    spec = ModelSpec("regression", ("y", "t"), ("y",), 4, 1, (0.0, 0.0), (1.0, 1.0), (0.0,), (1.0,))

    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = LSTMForecaster(spec)
        return model, torch.optim.Adam(model.parameters())

    path = tmp_path / "ckpt"
    model, optimiser = fresh()
    history = History()
    history.record(1.0, 0.5, model.state_dict())
    TrainingCheckpoint(path, "run").save(model, optimiser, history)
    content = DAMAGED_CHECKPOINTS[damage](torch.load(path, weights_only=True), path.read_bytes())
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(UsageError) as err:
        TrainingCheckpoint(path, "run").load(*fresh())
    message = str(err.value)
    assert message.startswith(f"train --resume: {path} is ") and "\n" not in message, message
    assert message.endswith("; delete it, or train without --resume, to start afresh"), message


def test_resume_from_a_damaged_checkpoint_ends_with_exit_2_and_one_line(sine_file: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint of this very run, but with a part missing; training without --resume then works, as told."""
    cfg = replace(SMALL, epochs=1)
    out = tmp_path / "m"
    monkeypatch.setattr(TrainingCheckpoint, "remove", lambda self: None)  # keep the run's checkpoint
    train(sine_file, out, cfg, log=quiet)
    saved = torch.load(checkpoint_path(out), weights_only=True)
    torch.save({k: v for k, v in saved.items() if k != "optimiser"}, checkpoint_path(out))
    args = ("--data", str(sine_file), "--out", str(out), *small_sets(cfg))
    result = train_command(*args, "--resume")
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"streamlstm train: train --resume: {checkpoint_path(out)} is not a training checkpoint "
                             "(it lacks optimiser); delete it, or train without --resume, to start afresh\n")
    assert train_command(*args).returncode == 0
    assert not checkpoint_path(out).exists()
