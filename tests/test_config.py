"""Configuration layers: defaults -> YAML -> STREAMLSTM_* environment -> --set; errors name the key."""

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


@pytest.mark.parametrize("overrides,env,message", [
    (["kafka.group_idd=x"], {}, "kafka.group_idd"),
    (["kafkaa.group_id=x"], {}, "kafkaa.group_id"),
    ([], {"STREAMLSTM_HTTP__PROT": "1"}, "http.prot"),
    (["http.port=eighty"], {}, "http.port"),
    ([], {"STREAMLSTM_KAFKA__CREATE_TOPICS": "perhaps"}, "kafka.create_topics"),
    (["http.port=70000"], {}, "http.port"),
    (["state.checkpoint_interval_ms=-5"], {}, "state.checkpoint_interval_ms"),
    (["model.device=tpu"], {}, "model.device"),
    (["no-equals-sign"], {}, "section.key=value"),
])
def test_bad_values_name_the_key(overrides, env, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(overrides=overrides, environ=env)


def test_wrong_types_in_the_file_name_the_key_and_file(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("kafka:\n  max_poll_records: lots\n")
    with pytest.raises(ConfigError, match=r"kafka\.max_poll_records.*c\.yaml"):
        load_config(file, environ={})
    file.write_text("kafka: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(file, environ={})


def test_serve_with_a_bad_config_exits_2_with_one_line(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("kafka:\n  bootstrap_server: 127.0.0.1:1\n")
    result = subprocess.run([sys.executable, "-m", "streamlstm", "serve", "--config", str(file)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "kafka.bootstrap_server" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
