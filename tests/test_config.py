"""Configuration layers: defaults -> YAML -> STREAMLSTM_* environment -> --set; errors name the key."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from streamlstm.config import Config, ConfigError, as_dict, load_config

DOCUMENTED = Path(__file__).parent.parent / "config" / "streamlstm.yaml"


def test_the_documented_file_lists_every_key_with_its_default():
    assert yaml.safe_load(DOCUMENTED.read_text()) == as_dict(Config())


def test_the_required_key_names_exist():
    cfg = load_config(environ={})
    for name in ("bootstrap_servers", "input_topic", "output_topic", "dlq_topic", "group_id", "create_topics"):
        assert hasattr(cfg.kafka, name)
    assert cfg.model.path and cfg.model.device == "auto" and cfg.http.port == 8080


def test_layers_override_in_order(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("kafka:\n  group_id: from-file\n  input_topic: file-topic\n  max_poll_records: 10\n")
    env = {"STREAMLSTM_KAFKA__GROUP_ID": "from-env", "STREAMLSTM_HTTP__PORT": "9100", "UNRELATED": "x"}
    cfg = load_config(file, ["kafka.group_id=from-set", "kafka.create_topics=false"], environ=env)
    assert cfg.kafka.group_id == "from-set"
    assert cfg.kafka.input_topic == "file-topic"
    assert cfg.kafka.max_poll_records == 10
    assert cfg.http.port == 9100
    assert cfg.kafka.create_topics is False
    assert cfg.kafka.output_topic == "predictions"


def test_a_string_key_keeps_text_that_looks_like_a_number():
    assert load_config(overrides=["kafka.group_id=123"], environ={}).kafka.group_id == "123"


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamlstm", "serve", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def assert_stops_startup(result: subprocess.CompletedProcess, *named: str) -> None:
    """Exit code 2 and one line that names the problem: no traceback to read through."""
    assert result.returncode == 2, result.stderr
    assert all(n in result.stderr for n in named), result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("sets,env,message", [
    (["kafka.group_idd=x"], {}, "kafka.group_idd"),  # unknown key
    (["kafkaa.group_id=x"], {}, "kafkaa.group_id"),  # unknown section
    ([], {"STREAMLSTM_HTTP__PROT": "1"}, "http.prot"),  # unknown key from the environment
    (["http.port=eighty"], {}, "http.port"),  # wrong type
    ([], {"STREAMLSTM_KAFKA__CREATE_TOPICS": "perhaps"}, "kafka.create_topics"),  # not a boolean
    (["http.port=70000"], {}, "http.port"),  # a port number that cannot be
    (["state.checkpoint_interval_ms=-5"], {}, "state.checkpoint_interval_ms"),  # a negative interval
    (["model.device=tpu"], {}, "model.device"),  # not one of the choices
    (["no-equals-sign"], {}, "section.key=value"),
    (["model.cpu_threads=" + "[" * 5000], {}, "model.cpu_threads"),  # PyYAML raised RecursionError
    ([], {"STREAMLSTM_MODEL__CPU_THREADS": "[" * 5000}, "model.cpu_threads"),  # likewise
])
def test_each_bad_setting_stops_startup_naming_the_key(sets, env, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(overrides=sets, environ=env)
    args = ["--config", str(DOCUMENTED), *(a for s in sets for a in ("--set", s))]
    assert_stops_startup(serve(*args, env=env), message)


@pytest.mark.parametrize("text,named", [
    ("kafka:\n  max_poll_records: lots\n", "kafka.max_poll_records"),  # wrong type
    ("kafka: [1, 2\n", "not valid YAML"),
    ("kafka:\n  bootstrap_server: 127.0.0.1:1\n", "kafka.bootstrap_server"),  # unknown key
    ("- a list\n", "mapping"),  # not a mapping of sections
    ("kafka: " + "[" * 5000 + "\n", "nests too deeply"),  # PyYAML raised RecursionError: a traceback
])
def test_each_bad_config_file_stops_startup_naming_the_file_and_key(tmp_path, text, named):
    file = tmp_path / "c.yaml"
    file.write_text(text)
    assert_stops_startup(serve("--config", str(file)), named, str(file))


def test_a_missing_config_file_stops_startup_naming_it(tmp_path):
    assert_stops_startup(serve("--config", str(tmp_path / "absent.yaml")), str(tmp_path / "absent.yaml"))


def test_serve_workers_is_a_positive_count_from_any_layer():
    assert load_config(environ={}).serve.workers == 1
    assert load_config(environ={"STREAMLSTM_SERVE__WORKERS": "3"}).serve.workers == 3
    with pytest.raises(ConfigError, match=r"serve\.workers: must be positive"):
        load_config(overrides=["serve.workers=0"], environ={})


def test_a_bad_model_stops_several_workers_once_before_any_starts(tmp_path):
    absent = tmp_path / "absent"
    result = serve("--config", str(DOCUMENTED), "--set", "serve.workers=2", "--set", f"model.path={absent}")
    assert_stops_startup(result, str(absent))
