"""Kafka credentials: from the environment (a Kubernetes Secret) to every kafka-python client."""

import pytest
from kafka import KafkaConsumer

from streamlstm.config import ConfigError, load_config
from streamlstm.transport.kafka_python import client_settings


def test_secret_environment_reaches_the_client_settings():
    env = {"STREAMLSTM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "STREAMLSTM_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
           "STREAMLSTM_KAFKA__SASL_PLAIN_USERNAME": "svc", "STREAMLSTM_KAFKA__SASL_PLAIN_PASSWORD": "s3cr3t:42",
           "STREAMLSTM_KAFKA__SSL_CHECK_HOSTNAME": "false"}
    settings = client_settings(load_config(environ=env).kafka)
    assert settings["security_protocol"] == "SASL_SSL" and settings["sasl_mechanism"] == "SCRAM-SHA-512"
    assert settings["sasl_plain_username"] == "svc" and settings["sasl_plain_password"] == "s3cr3t:42"
    assert settings["ssl_check_hostname"] is False and settings["ssl_cafile"] is None


def test_defaults_are_kafka_pythons_plaintext():
    settings = client_settings(load_config(environ={}).kafka)
    assert settings["security_protocol"] == "PLAINTEXT"
    defaults = KafkaConsumer.DEFAULT_CONFIG
    assert all(key in defaults for key in settings)
    assert all(settings[k] == defaults[k] for k in settings if k.startswith("ssl_") or k == "sasl_plain_password")


@pytest.mark.parametrize("key,value", [("security_protocol", "SASL"), ("sasl_mechanism", "GSSAPI")])
def test_an_unsupported_security_choice_names_the_key(key, value):
    with pytest.raises(ConfigError, match=f"kafka.{key}"):
        load_config(overrides=[f"kafka.{key}={value}"], environ={})
