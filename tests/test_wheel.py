"""streamlstm installs as a wheel: built from the checkout, installed (not editable) into a venv of its
own, and run from outside the checkout — the commands, the configuration file's defaults and a model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import make_model

ROOT = Path(__file__).resolve().parent.parent


def test_the_built_wheel_runs_every_command_from_outside_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next(dist.glob("streamlstm-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # torch and the other dependencies from the test environment (not its editable streamlstm: a .pth
    # line only adds the directory, and the editable finder is another .pth's, never read from there)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python, command = venv / "bin" / "python", venv / "bin" / "streamlstm"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=120)
    away = tmp_path / "elsewhere"
    away.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=120, cwd=away)

    where = run(python, "-c", "import streamlstm.cli; print(streamlstm.cli.__file__)")
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr
    helped = run(command, "--help")
    assert helped.returncode == 0 and all(c in helped.stdout for c in ("serve", "train", "import", "predict", "demo"))

    model = make_model(tmp_path / "model")
    config = away / "streamlstm.yaml"
    shutil.copy(ROOT / "config" / "streamlstm.yaml", config)  # the file users start from, every default in it
    checked = run(command, "serve", "--check", "--config", config, "--set", f"model.path={model}")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["model"] == str(model)
    missing = run(command, "serve", "--check", "--config", config, "--set", f"model.path={tmp_path / 'none'}")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1

    events = away / "events.jsonl"
    events.write_text("".join(json.dumps({"key": f"k{i % 3}", "features": [1.0 + i, 2.0, 3.0]}) + "\n" for i in range(9)))
    predicted = run(command, "predict", "--model", model, "--data", events)
    assert predicted.returncode == 0 and len(predicted.stdout.splitlines()) == 9, predicted.stderr
