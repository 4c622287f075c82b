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


def literal_keys() -> list[tuple[str, tuple[str, ...]]]:
    """Every key whose type is a Literal, with its choices, read from the dataclasses' annotations."""
    from typing import Literal, get_args, get_origin, get_type_hints

    return [(f"{section}.{key}", get_args(kind))
            for section, cls in get_type_hints(Config).items()
            for key, kind in get_type_hints(cls).items() if get_origin(kind) is Literal]


def test_the_choices_are_declared_on_the_fields_as_literal_types():
    """No side table: the keys that take one of a few strings say so in their annotation."""
    import streamlstm.config

    assert not hasattr(streamlstm.config, "_CHOICES")
    assert dict(literal_keys()) == {
        "kafka.client": ("kafka-python", "confluent"),
        "kafka.assignor": ("range", "cooperative-sticky"),
        "kafka.auto_offset_reset": ("earliest", "latest"),
        "kafka.compression_type": ("none", "gzip", "snappy", "lz4", "zstd"),
        "kafka.processing_guarantee": ("at_least_once", "exactly_once"),
        "kafka.security_protocol": ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
        "kafka.sasl_mechanism": ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
        "state.ttl_clock": ("processing_time", "event_time"),
        "state.dtype": ("float32", "bfloat16", "float16"),
        "events.invalid_feature": ("reject", "replace_with_mean"),
        "model.device": ("auto", "cpu", "cuda"),
        "model.on_reload": ("keep_state", "reset_state"),
        "train.task": ("regression", "classification"),
        "train.lr_schedule": ("cosine", "constant"),
        "log.level": ("DEBUG", "INFO", "WARNING", "ERROR"),
        "log.format": ("text", "json"),
    }


@pytest.mark.parametrize("name,choices", literal_keys())
def test_a_choice_key_takes_each_choice_and_refuses_others_from_every_layer(tmp_path, name, choices):
    section, key = name.split(".")
    for choice in choices:
        if choice != "confluent":  # kafka.client: confluent also needs its package: tested on its own
            assert getattr(getattr(load_config(overrides=[f"{name}={choice}"], environ={}), section), key) == choice
    refused = f"config: {name}: 'x' is not one of {', '.join(choices)}"
    env = {f"STREAMLSTM_{section.upper()}__{key.upper()}": "x"}
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump({section: {key: "x"}}))
    for layers in ({"overrides": [f"{name}=x"]}, {"environ": env}, {"path": file}):
        with pytest.raises(ConfigError) as err:
            load_config(**{"environ": {}, **layers})
        assert str(err.value) == refused
    file.write_text(yaml.safe_dump({section: {key: 5}}))
    with pytest.raises(ConfigError) as err:
        load_config(file, environ={})
    assert str(err.value) == f"config: {name}: expected str, got 5 (from {file})"


def test_the_exact_message_for_a_value_outside_the_choices():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["kafka.client=x"], environ={})
    assert str(err.value) == "config: kafka.client: 'x' is not one of kafka-python, confluent"


def test_list_keys_take_a_list_from_any_layer_and_refuse_other_values():
    assert load_config(overrides=["train.targets=[y, z]"], environ={}).train.targets == ["y", "z"]
    assert load_config(environ={"STREAMLSTM_TRAIN__CSV_FEATURE_COLUMNS": "[a]"}).train.csv_feature_columns == ["a"]
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.targets=y"], environ={})
    assert str(err.value) == "config: train.targets: expected list, got 'y' (from --set train.targets=y)"


def test_numbers_keep_their_checks_with_the_annotations_as_strings():
    """Ints widen to floats, a bool is not an int, and zero is allowed only where it means something."""
    cfg = load_config(overrides=["model.reload_interval_s=3", "train.grad_clip=0", "http.port=0"], environ={})
    assert cfg.model.reload_interval_s == 3.0 and isinstance(cfg.model.reload_interval_s, float)
    assert cfg.train.grad_clip == 0.0 and cfg.http.port == 0
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["http.port=true"], environ={})
    assert str(err.value) == "config: http.port: expected int, got True (from --set http.port=true)"
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["train.epochs=0"], environ={})
    assert str(err.value) == "config: train.epochs: must be positive, got 0"


def test_the_task_names_are_defined_once_in_config():
    from typing import get_args, get_type_hints

    from streamlstm import events
    from streamlstm.config import TASKS, Task, TrainConfig
    from streamlstm.model import artifact, network

    assert TASKS == get_args(Task) == ("regression", "classification")
    assert get_type_hints(TrainConfig)["task"] == Task == get_type_hints(network.ModelSpec)["task"]
    assert artifact.TASKS is TASKS and not hasattr(network, "TASKS")
    assert network.FLOAT32_MAX is events.FLOAT32_MAX
