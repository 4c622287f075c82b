"""The model artifact: a directory with weights as safetensors (never unpickled) and model.json.

model.json holds the ModelSpec, training metrics and a content-hash version computed over the weights
file and the spec, so a corrupt or edited artifact is caught at load time rather than served.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import TASKS, EventsConfig
from ..errors import UsageError
from ..events import EventDecoder
from .network import LSTMForecaster, ModelSpec

FORMAT = "streamlstm-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"


class ArtifactError(UsageError):
    """The artifact cannot be served; the message names the file and the problem."""


class Artifact:
    def __init__(self, model: LSTMForecaster, version: str, training: dict[str, Any], path: Path) -> None:
        self.model = model
        self.version = version
        self.training = training
        self.path = path

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    def decoder(self, events: EventsConfig) -> EventDecoder:
        """How events are checked for this model under `events`: the daemon's decoder and `streamlstm
        predict`'s are this one, so offline scoring rejects and replaces exactly as serving does."""
        replace = events.invalid_feature == "replace_with_mean"
        return EventDecoder(self.spec.features, events.max_key_bytes, events.max_value_bytes,
                            self.spec.feature_mean if replace else None, self.model.feature_limits())


def _version(weights: bytes, spec: dict[str, Any]) -> str:
    digest = hashlib.sha256(weights)
    digest.update(json.dumps(spec, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def save_artifact(model: LSTMForecaster, out: str | Path, training: dict[str, Any]) -> str:
    """Write the artifact under a temporary name and rename it into place; returns its version."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, tmp / WEIGHTS_FILE)
    spec = model.spec.to_json()
    version = _version((tmp / WEIGHTS_FILE).read_bytes(), spec)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "version": version, "spec": spec,
            "training": training}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return version


def non_finite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity."""
    return sorted(name for name, t in tensors.items() if not torch.isfinite(t).all())


def newest_artifact(path: str | Path) -> Path:
    """The artifact that model.path names: the directory itself if it holds a model.json, else its
    sub-directory whose model.json is newest. Hidden entries are skipped: save_artifact writes there."""
    path = Path(path)
    if (path / META_FILE).exists() or not path.is_dir():
        return path
    dated = [(written_at(d), d.name) for d in path.iterdir() if not d.name.startswith(".")]
    dated = [(mtime, name) for mtime, name in dated if mtime is not None]
    return path / max(dated)[1] if dated else path


def written_at(path: Path) -> int | None:
    """When an artifact directory was written (its model.json's mtime, ns); None if it is not one."""
    try:
        return (path / META_FILE).stat().st_mtime_ns
    except OSError:  # not an artifact, or removed meanwhile
        return None


def _read_meta(path: Path) -> dict[str, Any]:
    file = path / META_FILE
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"model: {file} is missing; point model.path at a directory written by "
                            "'streamlstm train'") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"model: {file} is not valid JSON ({exc}); re-export the model") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"model: {file} is not a streamlstm model description (format != {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"model: {file} has format_version {meta.get('format_version')!r}; this "
                            f"streamlstm reads version {FORMAT_VERSION}")
    return meta


def _finite_numbers(values: Any) -> bool:
    return isinstance(values, tuple) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _names(values: Any) -> bool:
    return isinstance(values, tuple) and all(isinstance(v, str) for v in values) and len(set(values)) == len(values)


def _spec(meta: dict[str, Any], file: Path) -> ModelSpec:
    raw: Any = meta.get("spec")
    try:
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        spec = ModelSpec(**fields)
    except (AttributeError, TypeError) as exc:
        raise ArtifactError(f"model: {file}: 'spec' is malformed ({exc})") from None
    # Checked first: the checks below take these for tuples of names and numbers.
    if not (_names(spec.features) and _names(spec.outputs)):
        raise ArtifactError(f"model: {file}: features and outputs must be lists of distinct names")
    stats = ("feature_mean", "feature_std", "target_mean", "target_std")
    if bad := [name for name in stats if not _finite_numbers(getattr(spec, name))]:
        raise ArtifactError(f"model: {file}: {', '.join(bad)}: each must be a list of finite numbers")
    n_in, n_out = spec.input_size, spec.output_size
    problems = [
        spec.task not in TASKS and f"task {spec.task!r} is not one of {TASKS}",
        not (isinstance(spec.hidden_size, int) and spec.hidden_size > 0) and "hidden_size must be a positive int",
        not (isinstance(spec.num_layers, int) and spec.num_layers > 0) and "num_layers must be a positive int",
        (n_in == 0 or n_out == 0) and "features and outputs must not be empty",
        len(spec.feature_mean) != n_in and f"feature_mean has {len(spec.feature_mean)} values for {n_in} features",
        len(spec.feature_std) != n_in and f"feature_std has {len(spec.feature_std)} values for {n_in} features",
        any(s <= 0 for s in spec.feature_std) and "feature_std must be positive",
        spec.task == "regression" and len(spec.target_mean) != n_out and "target_mean does not match outputs",
        spec.task == "regression" and len(spec.target_std) != n_out and "target_std does not match outputs",
    ]
    if found := [p for p in problems if isinstance(p, str)]:
        raise ArtifactError(f"model: {file}: {'; '.join(found)}")
    return spec


def load_artifact(path: str | Path, device: torch.device | str = "cpu") -> Artifact:
    """Load and check an artifact; any problem raises ArtifactError naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"model: {path} is not a directory; set model.path to a trained model's directory")
    meta = _read_meta(path)
    spec = _spec(meta, path / META_FILE)
    weights_file = path / WEIGHTS_FILE
    try:
        weights = weights_file.read_bytes()
        tensors = load_file(weights_file)
    except FileNotFoundError:
        raise ArtifactError(f"model: {weights_file} is missing; re-export the model") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"model: {weights_file} is corrupt or truncated ({exc})") from None
    if _version(weights, meta["spec"]) != meta.get("version"):
        raise ArtifactError(f"model: {path}: content does not match version {meta.get('version')!r} "
                            f"(weights or {META_FILE} were altered); re-export the model")
    with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: leave the caller's RNG be
        model = LSTMForecaster(spec)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))
        raise ArtifactError(f"model: {weights_file} does not match the architecture in {META_FILE}: "
                            f"differing tensors {diff[:4]}")
    if bad := non_finite_tensors(tensors):
        raise ArtifactError(f"model: {weights_file}: tensors {bad[:4]} hold NaN or infinite values (training "
                            "diverged?); every prediction would be NaN: retrain, e.g. with a lower train.learning_rate")
    model.load_state_dict(tensors)
    model.eval()
    return Artifact(model.to(device), meta["version"], meta.get("training", {}), path)
