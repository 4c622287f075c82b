"""Training data in: JSONL, CSV and a Kafka topic become the same per-key, time-ordered events."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import NotUtf8, produce, unique

from streamlstm.config import KafkaConfig, TrainConfig
from streamlstm.training.data import (
    TrainingDataError,
    key_series,
    read_csv,
    read_jsonl,
    read_kafka,
)
from streamlstm.transport.admin import ensure_topics
from streamlstm.transport.api import TopicError, UnreadableRecord


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


def as_tuples(data) -> list[tuple]:
    return [(e.key, e.ts, e.features) for e in data.events]


def test_events_are_grouped_per_key_and_ordered_by_time_then_position(tmp_path: Path) -> None:
    lines = [{"key": "b", "features": [1.0], "ts": 20}, {"key": "a", "features": [2.0], "ts": 30},
             {"key": "b", "features": [3.0], "ts": 10}, {"key": "a", "features": [4.0]},  # no ts: after its predecessor
             {"key": "a", "features": [5.0], "ts": 30}, {"key": "a", "features": [6.0], "ts": 5}]
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    data = read_jsonl(path)
    assert [(e.key, e.features[0]) for e in data.events] == [
        ("a", 6.0), ("a", 2.0), ("a", 4.0), ("a", 5.0), ("b", 3.0), ("b", 1.0)]


def test_an_event_line_nested_too_deep_to_parse_is_counted_as_rejected(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text('{"key": "a", "features": [1.0], "ts": 1}\n' + "[" * 3000 + "\n")
    data = read_jsonl(path)
    assert [e.features for e in data.events] == [[1.0]] and data.rejected == {"not_json": 1}


def test_csv_reads_named_columns_in_time_order(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", ["when", "id", "temp", "load", "note"], [
        ["2024-01-01T00:00:01", "m1", "20.5", "3", "0"],
        ["1704067200000", "m1", "19", "2", "0"],  # epoch ms: one second earlier than the row above
        ["2024-01-01T00:00:00+00:00", "m2", "7", "1", "0"],
    ])
    cfg = TrainConfig(csv_key_column="id", csv_time_column="when", csv_feature_columns=["load", "temp"])
    data = read_csv(path, cfg)
    assert data.features == ("load", "temp")
    assert as_tuples(data) == [("m1", 1704067200000, [2.0, 19.0]), ("m1", 1704067201000, [3.0, 20.5]),
                               ("m2", 1704067200000, [1.0, 7.0])]
    every_other = read_csv(path, replace(cfg, csv_feature_columns=[]))
    assert every_other.features == ("temp", "load", "note")  # 'note' is a column like any other


@pytest.mark.parametrize("header,row,message", [
    (["key", "ts", "y"], ["k", "1", "abc"], "row 3, column 'y': 'abc' is not a number"),
    (["key", "ts", "y"], ["k", "1", ""], "row 3, column 'y': '' is not a number"),
    (["key", "ts", "y"], ["k", "1", "nan"], "row 3, column 'y': 'nan' is not a finite number"),
    (["key", "ts", "y"], ["k", "soon", "1"], "row 3, column 'ts': 'soon' is neither"),
    (["key", "ts", "y"], ["", "1", "1"], "row 3, column 'key': the key is empty"),
    (["key", "ts", "y"], ["k", "1"], "row 3: column 'y' is missing"),
    (["key", "y"], ["k", "1"], "row 1 (header): no column 'ts'"),
])
def test_csv_errors_name_the_row_and_column(tmp_path: Path, header, row, message) -> None:
    path = write_csv(tmp_path / "bad.csv", header, [["k", "0", "1"][: len(header)], row])
    with pytest.raises(TrainingDataError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        read_csv(path, TrainConfig(csv_feature_columns=["y"]))
    assert str(path) in str(err.value)


def test_a_bad_csv_stops_the_train_command_with_exit_2(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "bad.csv", ["key", "ts", "load"], [["k", "1", "1.5"], ["k", "2", "high"]])
    result = subprocess.run([sys.executable, "-m", "streamlstm", "train", "--data", str(path), "--out",
                             str(tmp_path / "m")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "row 3, column 'load': 'high' is not a number" in result.stderr and "Traceback" not in result.stderr


def test_horizon_targets_the_value_that_many_events_ahead(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps({"key": "a", "features": [float(t)], "ts": t}) + "\n" for t in range(10)))
    (s,) = key_series(read_jsonl(path), ("f0",), TrainConfig(horizon=3, holdout_events=2))
    assert s.targets[:7, 0].tolist() == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    assert s.train.tolist() == [True] * 5 + [False] * 5 and s.valid.tolist() == [False] * 5 + [True] * 2 + [False] * 3


def test_a_topic_reads_as_the_equivalent_file(broker, tmp_path: Path) -> None:
    """Every partition from the start to its end; a record without 'ts' takes the record's timestamp."""
    lines = [{"key": f"k{k}", "features": {"y": float(t * 10 + k), "t": t}, "ts": 1000 + t}
             for t in range(15) for k in range(7)]
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    topic = unique("train")
    kafka = KafkaConfig(bootstrap_servers=broker.bootstrap, input_topic=topic, output_topic=f"{topic}-o",
                        dlq_topic=f"{topic}-d", topic_partitions=3)
    ensure_topics(kafka)
    produce(broker, topic, [(line["key"].encode(), json.dumps({k: v for k, v in line.items() if k != "key"}).encode())
                            for line in lines] + [(b"k0", b"{not json")])
    from_topic, from_file = read_kafka(kafka, topic), read_jsonl(path)
    assert as_tuples(from_topic) == as_tuples(from_file)
    assert from_topic.rejected == {"not_json": 1} and not from_file.rejected
    produce(broker, topic, [(b"late", b'{"features": [1.0, 2.0]}')])
    late = read_kafka(kafka, topic).events[-1]
    assert late.key == "late" and late.ts > 1_600_000_000_000  # the record's timestamp
    with pytest.raises(TopicError, match="does not exist"):
        read_kafka(kafka, unique("absent"))


def test_a_topic_record_kafka_python_cannot_parse_stops_training_saying_what_to_do(broker) -> None:
    topic = unique("train")
    kafka = KafkaConfig(bootstrap_servers=broker.bootstrap, input_topic=topic, output_topic=f"{topic}-o",
                        dlq_topic=f"{topic}-d", topic_partitions=1)
    ensure_topics(kafka)
    produce(broker, topic, [(b"k", b'{"features": [1.0]}', [(NotUtf8("trace"), b"1")])])
    with pytest.raises(UnreadableRecord, match="cannot read a record of .* train with --data"):
        read_kafka(kafka, topic)


def test_series_arrays_match_the_events(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps({"key": k, "features": [float(t)]}) + "\n" for t in range(4) for k in "ab"))
    series = key_series(read_jsonl(path), ("f0",), TrainConfig(holdout_events=1))
    assert [s.inputs[:, 0].tolist() for s in series] == [[0.0, 1.0, 2.0, 3.0]] * 2
    assert all(np.array_equal(s.valid, [False, False, True, False]) for s in series)
