"""`streamlstm predict`: an event file scored offline, one JSON line per event, in file order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

import msgspec

from ..config import EventsConfig
from ..events import (
    Event,
    Rejection,
    decode_line,
    prediction_record,
    read_event_lines,
)
from ..model.artifact import load_artifact
from .reference import score_events


def predict_file(model_dir: str | Path, data: str | Path, out: TextIO,
                 events_cfg: EventsConfig = EventsConfig(), state_dtype: str = "float32") -> tuple[int, int]:
    """Writes what the daemon would publish for each event (source is null: a file has no offsets),
    checking events as the daemon does under `events_cfg` (events.invalid_feature: replace_with_mean),
    its state rounded as the daemon's under that `state_dtype` (state.dtype).

    A rejected line gets a line naming its reason instead, and a control-only line (reset or end without
    features) a line saying its key's state was dropped. Returns (events, rejected).
    """
    artifact = load_artifact(model_dir)
    decoder = artifact.decoder(events_cfg)
    decoded = [(n, decode_line(decoder, obj)) for n, obj in read_event_lines(data)]
    events = [d for _, d in decoded if isinstance(d, Event)]
    predictions, steps = score_events(artifact, events, state_dtype=state_dtype)
    scored = iter(zip(events, predictions.tolist(), steps.tolist()))
    rejected = 0
    for line, d in decoded:
        if isinstance(d, Rejection):
            rejected += 1
            out.write(json.dumps({"line": line, "rejected": {"reason": d.reason, "detail": d.detail}}) + "\n")
            continue
        event, prediction, step = next(scored)
        if event.features is None:  # a control-only event: the daemon publishes nothing for it
            out.write(json.dumps({"line": line, "key": event.key, "dropped": True}) + "\n")
            continue
        record = prediction_record(event, prediction, step, artifact.version, None, event.ts)
        out.write(json.dumps({"line": line, **msgspec.to_builtins(record)}) + "\n")
    return len(events), rejected
