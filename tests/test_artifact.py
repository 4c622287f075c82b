"""The model artifact: safetensors + model.json; every fault stops startup naming the file."""

import json
import shutil

import pytest
import torch
from conftest import make_model
from test_config import DOCUMENTED

from streamlstm.cli import main
from streamlstm.model.artifact import (
    META_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    load_artifact,
    save_artifact,
)


def test_round_trip_keeps_weights_spec_and_version(tmp_path):
    path = make_model(tmp_path / "m", hidden_size=8, num_layers=3)
    artifact = load_artifact(path)
    assert artifact.spec.num_layers == 3 and artifact.spec.features == ("load", "temp", "hour")
    assert artifact.training == {"note": "random weights for tests"}
    again = save_artifact(artifact.model, tmp_path / "copy", artifact.training)
    assert again == artifact.version
    assert make_model(tmp_path / "other", seed=1).name and load_artifact(tmp_path / "other").version != again


def _damage(path, fault):
    meta_file, weights = path / META_FILE, path / WEIGHTS_FILE
    meta = json.loads(meta_file.read_text())
    if fault == "missing_dir":
        shutil.rmtree(path)
    elif fault == "missing_meta":
        meta_file.unlink()
    elif fault == "missing_weights":
        weights.unlink()
    elif fault == "meta_not_json":
        meta_file.write_text("{ this is not json")
    elif fault == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif fault == "altered_weights":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif fault == "format_version":
        meta["format_version"] = 99
        meta_file.write_text(json.dumps(meta))
    elif fault == "shape_mismatch":
        meta["spec"]["hidden_size"] = 17
        meta_file.write_text(json.dumps(meta))
    elif fault == "stats_mismatch":
        meta["spec"]["feature_mean"] = [0.0]
        meta_file.write_text(json.dumps(meta))
    elif fault == "stats_not_numbers":  # a TypeError traceback before
        meta["spec"]["feature_std"] = ["a", 1, 1]
        meta_file.write_text(json.dumps(meta))
    elif fault == "stats_not_finite":
        meta["spec"]["target_std"] = [float("nan")]
        meta_file.write_text(json.dumps(meta))
    elif fault == "duplicate_features":
        meta["spec"]["features"] = ["load", "load", "hour"]
        meta_file.write_text(json.dumps(meta))
    elif fault == "nan_weights":  # a consistent artifact, as a diverged training run would write: served NaN before
        model = load_artifact(path).model
        with torch.no_grad():
            model.head.weight[0, 0] = float("nan")
        save_artifact(model, path, {})


@pytest.mark.parametrize("fault,file,words", [
    ("missing_dir", "", "not a directory"),
    ("missing_meta", META_FILE, "missing"),
    ("missing_weights", WEIGHTS_FILE, "missing"),
    ("meta_not_json", META_FILE, "not valid JSON"),
    ("truncated_weights", WEIGHTS_FILE, "corrupt or truncated"),
    ("altered_weights", "", "does not match version"),
    ("format_version", META_FILE, "format_version 99"),
    ("shape_mismatch", "", "does not match"),
    ("stats_mismatch", META_FILE, "feature_mean"),
    ("stats_not_numbers", META_FILE, "feature_std: each must be a list of finite numbers"),
    ("stats_not_finite", META_FILE, "target_std: each must be a list of finite numbers"),
    ("duplicate_features", META_FILE, "distinct names"),
    ("nan_weights", WEIGHTS_FILE, "NaN or infinite"),
])
def test_each_fault_stops_startup_naming_the_file(tmp_path, capsys, fault, file, words):
    """`serve` in this process (tests/test_config.py starts it as a process: the exit code is the same)."""
    path = make_model(tmp_path / "m")
    _damage(path, fault)
    named = str(path / file).rstrip("/")
    with pytest.raises(ArtifactError) as err:
        load_artifact(path)
    assert named in str(err.value) and words in str(err.value)
    capsys.readouterr()
    assert main(["serve", "--config", str(DOCUMENTED), "--set", f"model.path={path}", "--set", "model.device=cpu"]) == 2
    stderr = capsys.readouterr().err
    assert named in stderr and words in stderr and "Traceback" not in stderr
