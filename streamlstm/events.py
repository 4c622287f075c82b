"""The wire format: event bytes in, prediction bytes out.

Decoding never raises: a malformed event becomes a Rejection with a stable reason code, before it can
touch any state. Knows nothing of Kafka clients or of torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import msgspec

CONTROL_FIELDS = ("reset", "end")  # reset: start the key from zero state; end: drop it after this event
LABEL_FIELD = "label"  # a classification event's class: for training and live accuracy, ignored by stepping
EVENT_FIELDS = frozenset({"features", "ts", LABEL_FIELD, *CONTROL_FIELDS})
TS_MIN, TS_MAX = -(1 << 63), (1 << 63) - 1  # Kafka's timestamps: signed 64-bit milliseconds
FLOAT32_MAX = 3.4028234663852886e38


@dataclass(slots=True)
class Event:
    """An accepted event; `features` is None for a control-only event (reset or end without features)."""

    key: str
    features: list[float] | None
    ts: int | None
    reset: bool = False
    end: bool = False
    replaced: int = 0  # feature values replaced by their training mean (events.invalid_feature policy)
    label: int | str | None = None  # its class, if it says (classification): never stepped on


class Rejection(NamedTuple):
    reason: str
    detail: str


REASONS = (
    "bad_key", "not_utf8", "not_json", "not_object", "unknown_field", "missing_features",
    "wrong_feature_count", "unknown_feature", "missing_feature", "non_numeric_feature",
    "non_finite_feature", "bad_ts", "bad_control", "bad_label", "key_too_large", "value_too_large",
)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: int | float) -> float | None:
    """The value as a float, or None for NaN, infinities and integers too large for a float."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _timestamp(value: int | float) -> int | None:
    """Epoch milliseconds as an int, or None unless finite and within Kafka's signed 64-bit timestamps
    (a larger one would overflow the state table's int64 times)."""
    if _finite(value) is None:
        return None
    ms = int(value)
    return ms if TS_MIN <= ms <= TS_MAX else None


def parse_json(text: str | bytes) -> Any:
    """json.loads, with JSON nested too deep to parse raised as the ValueError any other bad JSON is:
    json raises RecursionError for it, which would get past every handler of bad input (a 3 KB event
    of brackets stopped the daemon)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to parse") from None


def _wire_decoder(limits: Sequence[tuple[float, float]]) -> msgspec.json.Decoder:
    """Decodes and checks, in C, the common shape of a valid event: `features` as an array of one
    number a feature, each within its limits, optional `ts`, `reset` and `end`, nothing else. msgspec
    refuses NaN and numbers out of range, so whatever it accepts the full checks would accept identically."""
    bounded = tuple(Annotated[float, msgspec.Meta(ge=lo, le=hi)] for lo, hi in limits)
    features = tuple[bounded]  # type: ignore[valid-type]  # a type made at run time, one per model
    fields: list[tuple[str, Any, Any] | tuple[str, Any]] = [
        ("features", features), ("ts", int | float | None, None), ("reset", bool, False), ("end", bool, False),
        (LABEL_FIELD, int | str | None, None)]
    return msgspec.json.Decoder(msgspec.defstruct("WireEvent", fields, forbid_unknown_fields=True))


class EventDecoder:
    """Checks events against the model's feature names; features come out in the model's order.

    `limits` (the model's feature_limits) bound each feature's value: beyond them the model's float32
    step would overflow and the key's state turn NaN for good. Without them, float32's range. With
    `replacements` (the training means, one per feature), a non-numeric or non-finite feature value, or
    one beyond its limits, is replaced instead of rejecting the event.

    Speed: an event in the common shape is decoded by msgspec in well under a microsecond; any other
    (features by name, control-only, or invalid) takes the full checks, which name the reason.
    """

    def __init__(self, feature_names: Sequence[str], max_key_bytes: int = 1 << 30, max_value_bytes: int = 1 << 30,
                 replacements: Sequence[float] | None = None,
                 limits: Sequence[tuple[float, float]] | None = None) -> None:
        self.names = tuple(feature_names)
        self._index = {name: i for i, name in enumerate(self.names)}
        self.max_key_bytes = max_key_bytes
        self.max_value_bytes = max_value_bytes
        self.replacements = None if replacements is None else tuple(float(v) for v in replacements)
        self.limits = tuple((max(lo, -FLOAT32_MAX), min(hi, FLOAT32_MAX))
                            for lo, hi in (limits or [(-FLOAT32_MAX, FLOAT32_MAX)] * len(self.names)))
        self._wire = _wire_decoder(self.limits)

    def decode(self, key: bytes | None, value: bytes | None) -> Event | Rejection:
        if not key:
            return Rejection("bad_key", "the message key (the state key) is missing or empty")
        if len(key) > self.max_key_bytes:
            return Rejection("key_too_large", f"key of {len(key)} bytes; the limit is {self.max_key_bytes} "
                             "(events.max_key_bytes)")
        if value is not None and len(value) > self.max_value_bytes:
            return Rejection("value_too_large", f"value of {len(value)} bytes; the limit is "
                             f"{self.max_value_bytes} (events.max_value_bytes)")
        if value is None:
            return Rejection("not_json", "the value is null (a tombstone), not a JSON event; to drop a key's "
                             'state send {"reset": true} or {"end": true}')
        try:
            key_text = key.decode("utf-8")
            wire = self._wire.decode(value)
            ts = None if wire.ts is None else _timestamp(wire.ts)
            if wire.ts is None or ts is not None:
                return Event(key_text, list(wire.features), ts, wire.reset, wire.end, 0, wire.label)
        except (UnicodeDecodeError, msgspec.DecodeError):
            pass  # the full checks below say why
        try:
            key_text = key.decode("utf-8")
            text = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Rejection("not_utf8", f"key or value is not UTF-8: {exc}")
        try:
            obj = parse_json(text)
        except ValueError as exc:
            return Rejection("not_json", f"value is not JSON: {exc}")
        return self.decode_object(key_text, obj)

    def decode_object(self, key: str, obj: Any) -> Event | Rejection:
        if not isinstance(obj, dict):
            return Rejection("not_object", f"value is JSON {type(obj).__name__}, expected an object")
        unknown = obj.keys() - EVENT_FIELDS
        if unknown:
            return Rejection("unknown_field", f"unknown fields {sorted(unknown)}; allowed: {sorted(EVENT_FIELDS)}")
        label = obj.get(LABEL_FIELD)
        if label is not None and (not isinstance(label, (int, str)) or isinstance(label, bool)):
            return Rejection("bad_label", f"'label' must be an int or a string (a class), got {label!r:.40}")
        for name in CONTROL_FIELDS:
            if not isinstance(obj.get(name, False), bool):
                return Rejection("bad_control", f"{name!r} must be true or false, got {obj[name]!r:.40}")
        reset, end = obj.get("reset", False), obj.get("end", False)
        replaced = 0
        if "features" in obj:
            decoded = self._features(obj["features"])
            if isinstance(decoded, Rejection):
                return decoded
            features, replaced = decoded
        elif reset or end:
            features = None
        else:
            return Rejection("missing_features", "the event has no 'features' (only reset or end events may omit them)")
        ts = obj.get("ts")
        if ts is not None:
            ts = _timestamp(ts) if _is_number(ts) else None
            if ts is None:
                return Rejection("bad_ts", "'ts' must be a number of epoch milliseconds within Kafka's signed "
                                 f"64-bit timestamps, got {obj['ts']!r:.40}")
        return Event(key, features, ts, reset, end, replaced, label)

    def _features(self, raw: Any) -> tuple[list[float], int] | Rejection:
        if isinstance(raw, dict):
            unknown = raw.keys() - self._index.keys()
            if unknown:
                return Rejection("unknown_feature", f"unknown features {sorted(unknown)}; expected {list(self.names)}")
            missing = [name for name in self.names if name not in raw]
            if missing:
                return Rejection("missing_feature", f"missing features {missing}")
            values = [raw[name] for name in self.names]
        elif isinstance(raw, list):
            if len(raw) != len(self.names):
                return Rejection("wrong_feature_count", f"{len(raw)} features, the model takes {len(self.names)}")
            values = raw
        else:
            return Rejection("missing_features", f"'features' must be a list or an object, got {type(raw).__name__}")
        out, replaced = [], 0
        for i, (name, v, (lo, hi)) in enumerate(zip(self.names, values, self.limits)):
            number = _finite(v) if _is_number(v) else None
            if number is not None and lo <= number <= hi:
                out.append(number)
            elif self.replacements is not None:
                out.append(self.replacements[i])
                replaced += 1
            elif not _is_number(v):
                return Rejection("non_numeric_feature", f"feature {name!r} is {v!r:.40}, not a number")
            elif number is None or abs(number) > FLOAT32_MAX:
                return Rejection("non_finite_feature", f"feature {name!r} is {v!r:.40}: not a finite float32 (the "
                                 f"model's precision: at most {FLOAT32_MAX:.7g} in magnitude)")
            else:
                return Rejection("non_finite_feature", f"feature {name!r} is {v!r:.40}: so far from its training "
                                 f"mean that the model's float32 step would overflow (its limits: {lo:.4g} to {hi:.4g})")
        return out, replaced


class Source(msgspec.Struct):
    """Where a prediction's event was read (None for an event file): a consumer drops duplicates by it."""

    topic: str | None
    partition: int | None
    offset: int | None


class Prediction(msgspec.Struct):
    """What is published for one event; `step` counts the events applied to the key's state. A Struct,
    not a dict: built and encoded ~2.5x faster, per event (the fields encode in this order)."""

    key: str
    prediction: list[float]
    step: int
    model_version: str
    source: Source
    event_ts: int | None


NO_SOURCE = Source(None, None, None)


def prediction_record(
    event: Event, prediction: list[float], step: int, model_version: str,
    source: tuple[str, int, int] | None, event_ts: int | None,
) -> Prediction:
    return Prediction(event.key, prediction, step, model_version, Source(*source) if source else NO_SOURCE, event_ts)


_ENCODER = msgspec.json.Encoder()


def encode_record(record: Prediction) -> bytes:
    """Compact JSON, as json.dumps with separators=(",", ":") writes it."""
    return _ENCODER.encode(record)


def read_event_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Lines of a JSONL event file as (line number, parsed object or the JSON error)."""
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    yield number, parse_json(line)
                except ValueError as exc:
                    yield number, Rejection("not_json", f"line {number}: {exc}")


def decode_line(decoder: EventDecoder, obj: Any) -> Event | Rejection:
    """An event-file record: the wire format plus its 'key'."""
    if isinstance(obj, Rejection):
        return obj
    if not isinstance(obj, dict):
        return Rejection("not_object", f"line is JSON {type(obj).__name__}, expected an object")
    body = dict(obj)
    key = body.pop("key", None)
    if not isinstance(key, str) or not key:
        return Rejection("bad_key", "the record's 'key' is missing, empty or not a string")
    return decoder.decode_object(key, body)


def sequences(events: Sequence[Event]) -> list[list[int]]:
    """Positions of the events of each sequence: a key's events between resets and ends, as the daemon
    advances them."""
    open_: dict[str, list[int]] = {}
    done: list[list[int]] = []
    for i, event in enumerate(events):
        if event.key in open_ and (event.reset or event.features is None):
            done.append(open_.pop(event.key))
        if event.features is None:
            continue
        open_.setdefault(event.key, []).append(i)
        if event.end:
            done.append(open_.pop(event.key))
    return [seq for seq in done + list(open_.values()) if seq]
