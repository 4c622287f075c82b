"""TLS for real: the daemon's clients (kafka-python and confluent-kafka) over TLS to a broker behind
stunnel (tests/tls_terminator.py), which advertises only the TLS port, so nothing reaches it in plain
text after the first contact. With the broker's CA every event is predicted as offline; with another
CA the daemon waits alive and unready, publishes nothing, and says once which setting to check."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer
from conftest import (
    DaemonProcess,
    assert_equals_offline,
    consume_exactly,
    event_value,
    http_get,
    offline_predictions,
    produce,
    read_all,
    wait_until,
)
from test_durable_state import make_events
from tls_terminator import TlsTerminator, make_certificates

from streamlstm.config import KafkaConfig
from streamlstm.demo.broker import EmbeddedBroker, free_port
from streamlstm.transport.admin import ensure_topics
from streamlstm.transport.confluent import producer_config

CLIENTS = ["kafka-python", "confluent"]
REFUSED = "alert unknown ca"  # stunnel's line for a handshake the client broke off: it did not trust us


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedBroker, TlsTerminator]]:
    """A broker that sends its clients to the TLS terminator in front of it."""
    directory = tmp_path_factory.mktemp("tls")
    tls_port = free_port()
    with EmbeddedBroker(log_file=directory / "tansu.log", advertised_port=tls_port) as broker:
        terminator = TlsTerminator(directory, make_certificates(directory), tls_port, broker.port)
        yield broker, terminator
        terminator.close()


def tls_daemon(tmp_path: Path, tls: tuple[EmbeddedBroker, TlsTerminator], model_dir: Path, client: str,
               cafile: Path) -> DaemonProcess:
    """A daemon on `client` that reaches the broker only through the terminator, trusting `cafile`."""
    broker, terminator = tls
    return DaemonProcess(tmp_path, broker, model_dir, kafka__client=client,
                         kafka__bootstrap_servers=terminator.bootstrap, kafka__security_protocol="SSL",
                         kafka__ssl_cafile=str(cafile))


@pytest.mark.parametrize("client", CLIENTS)
def test_over_tls_with_the_brokers_ca_every_event_is_predicted_as_offline(tmp_path, tls, model_dir, client):
    broker, terminator = tls
    events = make_events(300, 30, seed=41)
    daemon = tls_daemon(tmp_path, tls, model_dir, client, terminator.certificates.ca)
    ensure_topics(KafkaConfig(**daemon.kafka))  # topic administration over TLS too
    produce(broker, daemon.topic, [(e["key"].encode(), event_value(e["features"], e["ts"])) for e in events],
            **terminator.client())
    try:
        daemon.start()
        published = consume_exactly(broker, daemon.kafka["output_topic"], len(events), **terminator.client())
        seen = assert_equals_offline(published, offline_predictions(tmp_path, model_dir, events), daemon.topic)
        assert len(seen) == len(events)
        assert daemon.stop() == 0
    finally:
        daemon.kill()


@pytest.mark.parametrize("client", CLIENTS)
def test_with_another_ca_the_daemon_waits_alive_and_unready_and_warns_once(tmp_path, tls, model_dir, client):
    """On either client it is topic administration (kafka-python's, first at startup) that meets the wrong
    CA; the confluent clients' own report is the next test's."""
    broker, terminator = tls
    daemon = tls_daemon(tmp_path, tls, model_dir, client, terminator.certificates.other_ca)
    trusted = KafkaConfig(**daemon.kafka | {"ssl_cafile": str(terminator.certificates.ca)})
    ensure_topics(trusted)  # events wait for it: all it lacks is trust in the broker
    produce(broker, daemon.topic, [(b"k", event_value([1, 2, 3]))], **terminator.client())
    refused_before = refusals(terminator)
    try:
        daemon.start(wait_ready=False)
        # several handshakes refused (its retries), not one: a warning per attempt would show
        daemon.wait_for(lambda: refusals(terminator) >= refused_before + 4, 30, "handshakes refused")
        assert http_get(daemon.port, "/healthz")[0] == 200 and http_get(daemon.port, "/readyz")[0] == 503
        log = daemon.log_file.read_text()
        warnings = re.findall(r"^.* WARNING .*certificate verify failed.*$", log, re.M)
        assert len(warnings) == 1 and "kafka.ssl_cafile" in warnings[0], log
        assert str(terminator.certificates.other_ca) in warnings[0]
        assert not re.search(r"^\S+ \S+ (ERROR|CRITICAL) ", log, re.M), log
        assert read_all(broker, daemon.kafka["output_topic"], **terminator.client()) == []
    finally:
        daemon.kill()


def test_librdkafka_clients_report_a_certificate_failure_once(tls, caplog, capfd):
    """The daemon's confluent clients start only once topic administration (kafka-python) has reached the
    broker, so with a wrong CA from the start the test above never gets to them: a CA changed under a
    running daemon would. Its producer alone, in this process, retrying: one warning, no error, and
    nothing raw on stderr (librdkafka's own log lines go through logging)."""
    _, terminator = tls
    cfg = KafkaConfig(bootstrap_servers=terminator.bootstrap, security_protocol="SSL", client="confluent",
                      ssl_cafile=str(terminator.certificates.other_ca))
    refused_before = refusals(terminator)
    producer = Producer(producer_config(cfg))
    try:
        wait_until(lambda: producer.poll(0.1) is not None and refusals(terminator) >= refused_before + 3, 30,
                   "handshakes refused", lambda: terminator.log_file.read_text())
        producer.poll(0.5)  # what the last refusals made librdkafka report and log
    finally:
        producer.close()
    warnings = [r.getMessage() for r in caplog.records if "certificate verify failed" in r.getMessage()]
    assert len(warnings) == 1 and "kafka.ssl_cafile" in warnings[0], caplog.text
    assert str(terminator.certificates.other_ca) in warnings[0]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "handshake failed" not in capfd.readouterr().err


def refusals(terminator: TlsTerminator) -> int:
    return terminator.log_file.read_text(errors="replace").count(REFUSED)


def test_each_form_of_a_failed_handshake_is_recognised_and_nothing_else():
    from streamlstm.transport.clients import tls_failure_kind

    verify = "certificate verify failed"
    assert tls_failure_kind("SSL handshake failed: ssl/statem: certificate verify failed: broker certificate") == verify
    assert tls_failure_kind("ssl://127.0.0.1:1/bootstrap: error:0A000086:SSL routines::certificate verify failed "
                            "(after 2ms in state SSL_HANDSHAKE)") == verify
    assert tls_failure_kind("Handshake failed: [SSL: WRONG_VERSION_NUMBER] wrong version number") == "handshake failed"
    assert tls_failure_kind("ssl://127.0.0.1:1/bootstrap: Connection refused (after 0ms in state CONNECT)") is None
