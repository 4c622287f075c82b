"""Training data in: JSONL event files, CSV files or a Kafka topic, turned into per-key series.

Every source ends up as the same `TrainingData` — accepted events grouped per key (keys in name order)
and ordered by time, then by position in the source — so the same events give the same model whichever
way they arrive. Knows nothing of torch.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..config import KafkaConfig, TrainConfig
from ..errors import UsageError
from ..events import (
    Event,
    EventDecoder,
    Rejection,
    decode_line,
    parse_json,
    read_event_lines,
    sequences,
)

Label = str | int | None
Position = tuple[int, int]  # (partition, offset) in a topic; (0, line number) in a file


class TrainingDataError(UsageError):
    """The data (with the train settings) cannot make a model; the message says what is missing."""


@dataclass
class TrainingData:
    """Accepted events grouped per key and in time order, with their labels and the rejections."""

    source: str  # the file or topic, for messages
    features: tuple[str, ...]
    events: list[Event]
    labels: list[Label]
    rejected: Counter[str]


@dataclass
class KeySeries:
    """One sequence (a key's history, or its part between resets) as arrays; `train` and `valid` mark
    which events carry a target of each part.

    `targets` holds raw values [n, outputs] for regression and class indices [n] for classification;
    rows without a target hold zeros and are never read.
    """

    positions: list[int]
    inputs: np.ndarray
    targets: np.ndarray
    train: np.ndarray
    valid: np.ndarray


def feature_names(records: Sequence[Any]) -> tuple[str, ...]:
    """Names from the first record with object features (their order is the model's), else f0..f{n-1}.

    Object features are preferred because they carry names; list features only carry a count.
    """
    features = [r.get("features") for r in records if isinstance(r, dict)]
    for raw in features:
        if isinstance(raw, dict) and raw:
            return tuple(raw)
    for raw in features:
        if isinstance(raw, list) and raw:
            return tuple(f"f{i}" for i in range(len(raw)))
    raise TrainingDataError("train: no event has non-empty 'features' (a list or an object); nothing to train on")


def in_time_order(events: list[Event], labels: list[Label], positions: list[Position]) -> tuple[list[Event], list[Label]]:
    """Events grouped per key (keys sorted) and ordered by time, then position in the source.

    An event without a time is taken to be at its key's previous event's time, so it keeps its place.
    """
    last: dict[str, int] = {}
    order = []
    for i, event in enumerate(events):
        ts = last.get(event.key, 0) if event.ts is None else event.ts
        last[event.key] = ts
        order.append((event.key, ts, positions[i], i))
    order.sort()
    return [events[o[-1]] for o in order], [labels[o[-1]] for o in order]


def decode_records(source: str, records: list[tuple[Position, Any]]) -> TrainingData:
    """Decode event-file records (wire format plus 'key' and optional 'label'); rejections are counted."""
    names = feature_names([obj for _, obj in records])
    decoder = EventDecoder(names)
    events: list[Event] = []
    labels: list[Label] = []
    positions: list[Position] = []
    rejected: Counter[str] = Counter()
    for position, obj in records:
        event = decode_line(decoder, obj)
        if isinstance(event, Rejection):
            rejected[event.reason] += 1
            continue
        events.append(event)
        labels.append(event.label)
        positions.append(position)
    return TrainingData(source, names, *in_time_order(events, labels, positions), rejected)


def read_jsonl(path: str | Path) -> TrainingData:
    """A JSONL event file; a line's place in the file breaks ties in time."""
    return decode_records(str(path), [((0, number), obj) for number, obj in read_event_lines(path)])


def _kafka_object(key: bytes | None, value: bytes | None, timestamp: int) -> Any:
    """A topic record as an event-file record: 'key' from the message key, 'ts' from the record if absent."""
    try:
        obj = parse_json((value or b"").decode("utf-8"))
        key_text = key.decode("utf-8") if key else None
    except UnicodeDecodeError as exc:
        return Rejection("not_utf8", f"record key or value is not UTF-8: {exc}")
    except ValueError as exc:
        return Rejection("not_json", f"record value is not JSON: {exc}")
    if isinstance(obj, dict):
        obj = {"ts": timestamp, **obj, "key": key_text}
    return obj


def read_kafka(kafka: KafkaConfig, topic: str) -> TrainingData:
    """Every partition of `topic` from the beginning to its end when reading started."""
    from ..transport.readers import read_topic

    records = read_topic(kafka, topic)
    return decode_records(f"topic {topic!r}",
                          [((r.partition, r.offset), _kafka_object(r.key, r.value, r.timestamp)) for r in records])


def _number(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TrainingDataError(f"train: {where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise TrainingDataError(f"train: {where}: {text!r} is not a finite number")
    return value


def _time_ms(text: str, where: str) -> int:
    """Epoch milliseconds, or an ISO 8601 date-time (UTC unless it says otherwise)."""
    try:
        return int(_number(text, where))
    except TrainingDataError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise TrainingDataError(f"train: {where}: {text!r} is neither epoch milliseconds nor an ISO 8601 "
                                "date-time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return round(moment.timestamp() * 1000)


def _csv_columns(header: list[str], path: Path, cfg: TrainConfig) -> tuple[str, ...]:
    """The feature columns (named, or every column but key, time and label); each named column must exist."""
    special = [cfg.csv_key_column, cfg.csv_time_column]
    if cfg.task == "classification":
        special.append(cfg.csv_label_column)
    features = tuple(cfg.csv_feature_columns) or tuple(c for c in header if c not in special + [cfg.csv_label_column])
    missing = [c for c in [*special, *features] if c not in header]
    if missing:
        raise TrainingDataError(f"train: {path} row 1 (header): no column {missing[0]!r} (train.csv_* settings); "
                                f"the columns are {header}")
    if not features:
        raise TrainingDataError(f"train: {path} has no feature columns besides key and time; set "
                                "train.csv_feature_columns")
    return features


def read_csv(path: str | Path, cfg: TrainConfig) -> TrainingData:
    """A CSV file with a header row; any bad cell stops training with its row (file line) and column."""
    path = Path(path)
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        features = _csv_columns(list(reader.fieldnames or []), path, cfg)
        events: list[Event] = []
        labels: list[Label] = []
        positions: list[Position] = []
        for row in reader:
            def cell(column: str) -> str:
                value = row.get(column)
                if value is None:
                    raise TrainingDataError(f"train: {path} row {reader.line_num}: column {column!r} is missing "
                                            "(the row has fewer cells than the header)")
                return value

            where = f"{path} row {reader.line_num}, column"
            key = cell(cfg.csv_key_column)
            if not key:
                raise TrainingDataError(f"train: {where} {cfg.csv_key_column!r}: the key is empty")
            values = [_number(cell(c), f"{where} {c!r}") for c in features]
            ts = _time_ms(cell(cfg.csv_time_column), f"{where} {cfg.csv_time_column!r}")
            events.append(Event(key, values, ts))
            labels.append(cell(cfg.csv_label_column) or None if cfg.task == "classification" else None)
            positions.append((0, reader.line_num))
    return TrainingData(str(path), features, *in_time_order(events, labels, positions), Counter())


def read_training_data(path: str | Path, cfg: TrainConfig) -> TrainingData:
    """A file by its suffix: .csv is CSV, anything else JSONL events."""
    return read_csv(path, cfg) if Path(path).suffix.lower() == ".csv" else read_jsonl(path)


def class_names(labels: Iterable[Label]) -> tuple[str, ...]:
    """Distinct labels as strings, integers in numeric order before other strings, for a stable order."""
    names = {str(label) for label in labels if label is not None}
    return tuple(sorted(names, key=lambda s: (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)))


def target_indices(features: Sequence[str], targets: Sequence[str]) -> list[int]:
    """Positions of the regression targets among the features; the first feature by default."""
    unknown = [t for t in targets if t not in features]
    if unknown:
        raise TrainingDataError(f"train.targets: {unknown} are not features of the data ({list(features)})")
    return [features.index(t) for t in targets] if targets else [0]


def model_outputs(data: TrainingData, cfg: TrainConfig) -> tuple[tuple[str, ...], list[int]]:
    """What the model predicts: the target features and their columns, or the classes (no columns)."""
    if cfg.task == "classification":
        if cfg.targets:
            raise TrainingDataError("train.targets applies to regression only; classification predicts 'label'")
        if not any(label is not None for label in data.labels):
            raise TrainingDataError("train: task is classification but no accepted event has a 'label'")
        return class_names(data.labels), []
    column = target_indices(data.features, cfg.targets)
    return tuple(data.features[i] for i in column), column


def key_series(data: TrainingData, outputs: tuple[str, ...], cfg: TrainConfig) -> list[KeySeries]:
    """Cut the events into sequences as the daemon does (per key, restarting at reset and after end),
    attach each event's target and split by time.

    A regression target is the value of the output features `train.horizon` events later in the same
    sequence; a classification target is the event's own label. The last `train.holdout_events` targets
    of each sequence are validation, the earlier ones training.
    """
    column = [data.features.index(o) for o in outputs] if cfg.task == "regression" else []
    class_index = {name: i for i, name in enumerate(outputs)}
    series = []
    for positions in sequences(data.events):
        inputs = np.array([data.events[i].features for i in positions], dtype=np.float32)
        n = len(positions)
        if cfg.task == "regression":
            targets = np.zeros((n, len(column)), dtype=np.float32)
            targets[: max(n - cfg.horizon, 0)] = inputs[cfg.horizon :, column]
            has_target = np.arange(n) < n - cfg.horizon
        else:
            labels = [data.labels[i] for i in positions]
            targets = np.array([0 if lab is None else class_index[str(lab)] for lab in labels], dtype=np.int64)
            has_target = np.array([lab is not None for lab in labels])
        valid = has_target & (np.cumsum(has_target[::-1])[::-1] <= cfg.holdout_events)
        series.append(KeySeries(positions, inputs, targets, has_target & ~valid, valid))
    return series


def training_part(s: KeySeries) -> np.ndarray:
    """The events before a sequence's first validation target: the only ones allowed to shape normalisation."""
    first_valid = np.flatnonzero(s.valid)
    return np.arange(len(s.positions)) < (first_valid[0] if len(first_valid) else len(s.positions))
