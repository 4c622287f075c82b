"""`streamlstm import`: a plain PyTorch LSTM (nn.LSTM and an nn.Linear on its last step's output, as the
tutorials' `LSTMModel` is, trained in its own loop) turned into a model artifact the daemon serves.

The weights come from safetensors, or from a torch file loaded with `weights_only=True` (never unpickled
otherwise). The architecture is read from their shapes. What cannot be served one event at a time is
refused with the reason: a bidirectional LSTM (its backward direction reads the sequence from its end)
or a projected one (proj_size). `batch_first` does not change the weights, so either imports the same.
The tutorials train on raw features, so without `--stats` normalisation is the identity.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..config import TASKS, Task
from ..errors import UsageError
from .artifact import save_artifact
from .network import LSTMForecaster, ModelSpec

LSTM_NAMES = ("lstm.",)
HEAD_NAMES = ("fc.", "linear.", "head.")
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")  # where training checkpoints keep the weights
_LAYER = re.compile(r"^(weight|bias)_(ih|hh|hr)_l(\d+)(_reverse)?$")


class WeightsError(UsageError):
    """Weights that are not a servable LSTM with a linear head; the message says what was found."""


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors by name: safetensors, or a torch file of tensors (or a checkpoint holding them)."""
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        raise WeightsError(f"{path}: not a torch file of weights that loads with weights_only=True "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); save the "
                           "model's state_dict(), not the model object") from None
    if isinstance(loaded, dict):
        for key in CHECKPOINT_KEYS:
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsError(f"{path}: expected a state_dict (names to tensors), found {type(loaded).__name__}")
    return loaded


def _module(weights: dict[str, torch.Tensor], names: tuple[str, ...], what: str, path: Path) -> dict[str, torch.Tensor]:
    """The parameters under the first of `names` that is there, without it."""
    for name in names:
        found = {k[len(name):]: v for k, v in weights.items() if k.startswith(name)}
        if found:
            return found
    raise WeightsError(f"{path}: no {what} parameters under {' / '.join(names)} (found {sorted(weights)[:8]}); "
                       "use --prefix for another module name")


def lstm_layers(lstm: dict[str, torch.Tensor], path: Path) -> tuple[int, int, int]:
    """(input size, hidden size, layers) of nn.LSTM parameters; refuses what one event at a time cannot serve."""
    parsed = [_LAYER.match(name) for name in lstm]
    if not all(parsed):
        raise WeightsError(f"{path}: not nn.LSTM parameters: {sorted(n for n, m in zip(lstm, parsed) if not m)[:4]}")
    if any(m and m.group(4) for m in parsed):
        raise WeightsError(f"{path}: a bidirectional LSTM: its backward direction reads each sequence from its end, "
                           "so it cannot be served one event at a time")
    if any(m and m.group(2) == "hr" for m in parsed):
        raise WeightsError(f"{path}: a projected LSTM (proj_size): not supported; only plain nn.LSTM layers step here")
    layers = 1 + max(int(m.group(3)) for m in parsed if m)
    w_ih = lstm.get("weight_ih_l0")
    if w_ih is None or w_ih.dim() != 2 or w_ih.shape[0] % 4:
        raise WeightsError(f"{path}: weight_ih_l0 must be [4 x hidden, inputs]")
    hidden, inputs = w_ih.shape[0] // 4, w_ih.shape[1]
    for k in range(layers):
        want = {f"weight_ih_l{k}": (4 * hidden, inputs if k == 0 else hidden), f"weight_hh_l{k}": (4 * hidden, hidden),
                f"bias_ih_l{k}": (4 * hidden,), f"bias_hh_l{k}": (4 * hidden,)}
        for name, shape in want.items():
            if name not in lstm:
                raise WeightsError(f"{path}: {name} is missing (an LSTM without biases is not supported)")
            if tuple(lstm[name].shape) != shape:
                raise WeightsError(f"{path}: {name} is {list(lstm[name].shape)}, expected {list(shape)} for "
                                   f"{layers} layers of hidden size {hidden}")
    return inputs, hidden, layers


def import_weights(weights_file: str | Path, out: str | Path, features: list[str], outputs: list[str] | None = None,
                   task: Task = "regression", stats: str | Path | None = None, prefix: str = "") -> str:
    """Write the artifact and return its version."""
    path = Path(weights_file)
    if task not in TASKS:
        raise WeightsError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    weights = {k[len(prefix):]: v for k, v in read_weights(path).items() if k.startswith(prefix)}
    lstm = _module(weights, LSTM_NAMES, "LSTM", path)
    head = _module(weights, HEAD_NAMES, "linear head", path)
    inputs, hidden, layers = lstm_layers(lstm, path)
    if set(head) != {"weight", "bias"} or head["weight"].dim() != 2:
        raise WeightsError(f"{path}: the head is not one nn.Linear (found {sorted(head)})")
    size = head["weight"].shape[0]
    if head["weight"].shape[1] != hidden:
        raise WeightsError(f"{path}: the head takes {head['weight'].shape[1]} inputs, the LSTM's hidden size is {hidden}")
    if len(features) != inputs:
        raise WeightsError(f"--features names {len(features)} features, the LSTM takes {inputs} inputs")
    names = tuple(outputs or _default_outputs(features, size, task))
    if len(names) != size:
        raise WeightsError(f"--outputs names {len(names)} outputs, the head gives {size}")
    spec = ModelSpec(task, tuple(features), names, hidden, layers, *_stats(stats, len(features), size, task))
    model = LSTMForecaster(spec)
    model.lstm.load_state_dict(lstm)
    model.head.load_state_dict(head)
    return save_artifact(model, out, {"imported_from": str(path)})


def _default_outputs(features: list[str], size: int, task: str) -> list[str]:
    if task == "classification":
        return [str(i) for i in range(size)]
    if size == len(features):
        return list(features)
    if size == 1:
        return features[:1]
    raise WeightsError(f"the head gives {size} outputs: name them with --outputs")


def _stats(path: str | Path | None, features: int, outputs: int, task: str) -> tuple[tuple[float, ...], ...]:
    """feature_mean, feature_std, target_mean, target_std: from a JSON file, or the identity."""
    regression = task == "regression"
    identity = {"feature_mean": [0.0] * features, "feature_std": [1.0] * features,
                "target_mean": [0.0] * outputs if regression else [], "target_std": [1.0] * outputs if regression else []}
    given: dict[str, Any] = {}
    if path is not None:
        try:
            given = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise WeightsError(f"--stats {path}: not a readable JSON file ({exc})") from None
    unknown = sorted(set(given) - set(identity))
    if unknown:
        raise WeightsError(f"--stats {path}: unknown keys {unknown}; expected some of {sorted(identity)}")
    merged = identity | given
    for key, value in merged.items():
        if not isinstance(value, list) or len(value) != len(identity[key]) or not all(
                isinstance(v, (int, float)) for v in value):
            raise WeightsError(f"--stats {path}: {key} must be a list of {len(identity[key])} numbers")
    return tuple(tuple(float(v) for v in merged[k]) for k in ("feature_mean", "feature_std", "target_mean", "target_std"))
