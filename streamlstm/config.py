"""Configuration: defaults, then a YAML file, then STREAMLSTM_* environment variables, then --set.

Every key is declared once, in the dataclasses below, with its type and default. A key that is not
declared, or a value of the wrong type, is an error naming the key and where the value came from.
Keys that take one of a few strings say so in their type, as a Literal, so the choices live beside the key.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import socket
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from .errors import UsageError

ENV_PREFIX = "STREAMLSTM_"


Task = Literal["regression", "classification"]
TASKS: tuple[str, ...] = get_args(Task)  # the one list: the model and its artifact check against it
StateDtype = Literal["float32", "bfloat16", "float16"]  # state/dtypes.py's element types


class ConfigError(UsageError):
    """A configuration problem; the message names the key or file and what to do."""


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = "127.0.0.1:9092"
    client: Literal["kafka-python", "confluent"] = "kafka-python"
    input_topic: str = "events"
    output_topic: str = "predictions"
    dlq_topic: str = "events-dlq"
    shadow_topic: str = ""
    group_id: str = "streamlstm"
    group_instance_id: str = ""
    assignor: Literal["range", "cooperative-sticky"] = "range"
    client_id: str = "streamlstm"
    create_topics: bool = True
    topic_partitions: int = 4
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: int = 45000
    heartbeat_interval_ms: int = 3000
    max_poll_records: int = 2000
    poll_timeout_ms: int = 100
    fetch_max_wait_ms: int = 20
    compression_type: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "none"
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    transactional_id: str = ""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_plain_username: str = ""
    sasl_plain_password: str = ""
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_password: str = ""
    ssl_check_hostname: bool = True

    def transactional_id_or_default(self) -> str:
        """Stable per instance, so a restarted instance fences its predecessor and aborts its transaction."""
        return self.transactional_id or f"{self.group_id}-{socket.gethostname()}"


@dataclass(frozen=True)
class ModelConfig:
    path: str = "model"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_threads: int = 1
    reload_interval_s: float = 10.0
    on_reload: Literal["keep_state", "reset_state"] = "keep_state"
    live_accuracy: bool = True
    shadow_path: str = ""


@dataclass(frozen=True)
class EventsConfig:
    max_key_bytes: int = 1024
    max_value_bytes: int = 65536
    invalid_feature: Literal["reject", "replace_with_mean"] = "reject"


@dataclass(frozen=True)
class StateConfig:
    checkpoint_interval_ms: int = 5000
    changelog_topic: str = ""
    dir: str = ""
    ttl_seconds: float = 604800.0
    ttl_clock: Literal["processing_time", "event_time"] = "processing_time"
    max_resident_keys: int = 0
    dtype: StateDtype = "float32"

    def dir_or_default(self) -> Path:
        """The local stores' directory: state.dir, or one under the system's temporary directory."""
        return Path(self.dir) if self.dir else Path(tempfile.gettempdir()) / "streamlstm-state"

    def changelog_for(self, kafka: KafkaConfig, shadow: bool = False) -> str:
        """Per group and input topic, like Kafka Streams' <application.id>-<store>-changelog; the shadow
        model's state beside it, with -shadow appended."""
        topic = self.changelog_topic or f"{kafka.group_id}-{kafka.input_topic}-changelog"
        return f"{topic}-shadow" if shadow else topic


@dataclass(frozen=True)
class HttpConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    liveness_timeout_s: float = 30.0
    stall_timeout_s: float = 120.0
    expose_state: bool = False


@dataclass(frozen=True)
class ServeConfig:
    workers: int = 1


@dataclass(frozen=True)
class TrainConfig:
    task: Task = "regression"
    targets: list[str] = field(default_factory=list)
    hidden_size: int = 32
    num_layers: int = 2
    horizon: int = 1
    epochs: int = 60
    learning_rate: float = 0.01
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    batch_keys: int = 64
    tbptt_steps: int = 32
    holdout_events: int = 8
    patience: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    csv_key_column: str = "key"
    csv_time_column: str = "ts"
    csv_feature_columns: list[str] = field(default_factory=list)
    csv_label_column: str = "label"


@dataclass(frozen=True)
class LogConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True)
class Config:
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    state: StateConfig = field(default_factory=StateConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


# Numbers where 0 means something (a free port, no clipping, keep for ever, never look): 0 is allowed.
_ZERO_ALLOWED = ("http.port", "train.seed", "train.grad_clip", "state.ttl_seconds", "model.reload_interval_s",
                 "state.max_resident_keys")


def _key_types(cls: type) -> dict[str, Any]:
    """Each field's type, in declaration order; get_type_hints since the annotations are strings."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _sections() -> dict[str, type]:
    return _key_types(Config)


def _choices(kind: Any) -> tuple[Any, ...]:
    """The values a Literal key allows; () for any other key."""
    return get_args(kind) if get_origin(kind) is Literal else ()


def _base(kind: Any) -> type:
    """The type a key's value has at run time: str for a Literal of strings, list for list[str]."""
    if choices := _choices(kind):
        return type(choices[0])
    return get_origin(kind) or kind


def _coerce(name: str, kind: type, value: Any, origin: str) -> Any:
    """Check a value from YAML (already typed) against the key's type; ints widen to floats."""
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, list),
    }[kind]
    if not ok:
        raise ConfigError(f"config: {name}: expected {kind.__name__}, got {value!r:.80} (from {origin})")
    return float(value) if kind is float else value


def _parse_text(kind: type, text: str) -> Any:
    """Turn an environment or --set string into a typed value (a str key takes the text as it is)."""
    if kind is str:
        return text
    if kind is bool and text.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
        return text.lower() in ("true", "yes", "1", "on")
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):  # PyYAML recurses once a nesting level
        return text


def _validate(name: str, kind: Any, value: Any) -> None:
    choices = _choices(kind)
    if choices and value not in choices:
        raise ConfigError(f"config: {name}: {value!r} is not one of {', '.join(choices)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if name == "http.port" and not 0 <= value <= 65535:
            raise ConfigError(f"config: {name}: {value} is not a TCP port (0-65535)")
        if value < 0 or (value == 0 and name not in _ZERO_ALLOWED):
            raise ConfigError(f"config: {name}: must be positive, got {value}")


class _Builder:
    """Accumulates overrides per section, checking each key on the way in."""

    def __init__(self) -> None:
        self.sections = _sections()
        self.values: dict[str, dict[str, Any]] = {name: {} for name in self.sections}

    def _kind(self, name: str, origin: str) -> type:
        """The run-time type of a declared key's value; an unknown key is an error naming it."""
        section, _, key = name.partition(".")
        if section not in self.sections or not key:
            raise ConfigError(
                f"config: unknown key {name!r} (from {origin}); sections are: {', '.join(self.sections)}"
            )
        kinds = _key_types(self.sections[section])
        if key not in kinds:
            raise ConfigError(
                f"config: unknown key {name!r} (from {origin}); keys of {section!r} are: {', '.join(kinds)}"
            )
        return _base(kinds[key])

    def set_typed(self, name: str, value: Any, origin: str) -> None:
        kind = self._kind(name, origin)
        section, key = name.split(".")
        self.values[section][key] = _coerce(name, kind, value, origin)

    def set_text(self, name: str, text: str, origin: str) -> None:
        self.set_typed(name, _parse_text(self._kind(name, origin), text), origin)

    def build(self) -> Config:
        parts = {s: cls(**self.values[s]) for s, cls in self.sections.items()}
        for section, part in parts.items():
            kinds = _key_types(type(part))
            for key, value in dataclasses.asdict(part).items():
                _validate(f"{section}.{key}", kinds[key], value)
        _check_client(parts["kafka"])
        _check_resident(parts["state"], parts["kafka"])
        _check_shadow(parts["model"], parts["state"])
        return Config(**parts)


def _check_shadow(model: ModelConfig, state: StateConfig) -> None:
    if model.shadow_path and state.max_resident_keys:
        raise ConfigError("config: model.shadow_path cannot be combined with state.max_resident_keys yet (a shadow "
                          "keeps every key resident); set state.max_resident_keys: 0 or remove model.shadow_path")


def _check_resident(state: StateConfig, kafka: KafkaConfig) -> None:
    """A batch's keys are all resident while it steps: a bound below a poll's records could not hold them."""
    if 0 < state.max_resident_keys < kafka.max_poll_records:
        raise ConfigError(f"config: state.max_resident_keys: {state.max_resident_keys} is below "
                          f"kafka.max_poll_records ({kafka.max_poll_records}), the keys one batch may step; raise "
                          "it (or lower kafka.max_poll_records), or set 0 for no bound")


def _check_client(kafka: KafkaConfig) -> None:
    if kafka.client != "confluent":
        return
    if kafka.processing_guarantee == "exactly_once":
        raise ConfigError("config: kafka.client: confluent supports processing_guarantee at_least_once only; "
                          "set kafka.client: kafka-python for exactly_once")
    if importlib.util.find_spec("confluent_kafka") is None:
        raise ConfigError("config: kafka.client: confluent needs the confluent-kafka package: "
                          "pip install 'streamlstm[confluent]', or set kafka.client: kafka-python")


def _read_yaml(path: Path) -> Mapping[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config: file {path} does not exist; pass an existing file to --config") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:  # PyYAML recurses once a nesting level
        raise ConfigError(f"config: {path} nests too deeply to parse; a config is sections of keys") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration from its four layers, each overriding the one before."""
    builder = _Builder()
    if path is not None:
        for section, keys in _read_yaml(Path(path)).items():
            if not isinstance(keys, dict):
                raise ConfigError(f"config: {section}: expected a mapping of keys (in {path})")
            for key, value in keys.items():
                builder.set_typed(f"{section}.{key}", value, str(path))
    env = os.environ if environ is None else environ
    for var, text in sorted(env.items()):
        if var.startswith(ENV_PREFIX) and "__" in var:
            section, key = var[len(ENV_PREFIX) :].lower().split("__", 1)
            builder.set_text(f"{section}.{key}", text, f"environment variable {var}")
    for item in overrides:
        name, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"config: --set {item!r}: expected section.key=value")
        builder.set_text(name.strip(), text, f"--set {item}")
    return builder.build()


def as_dict(config: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(config)
