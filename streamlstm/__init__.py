"""streamlstm: a streaming stateful LSTM predictor. `streamlstm.StatefulLSTM` is its library API
(model/stateful.py), imported on first use: the CLI and the serve.workers supervisor never load torch
through this package."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "StatefulLSTM":
        from .model.stateful import StatefulLSTM

        return StatefulLSTM
    raise AttributeError(f"module 'streamlstm' has no attribute {name!r}")
