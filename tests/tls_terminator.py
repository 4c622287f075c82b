"""TLS in front of the embedded broker, which serves none itself: Debian's stunnel4 accepts TLS on one
port and forwards the plain bytes to the broker's port, and the broker advertises the TLS port, so every
client (the daemon's and the harness's) speaks TLS after its first contact too. Certificates come from
the openssl CLI: a CA, a broker certificate for IP 127.0.0.1 signed by it, and an unrelated CA that a
client must refuse to trust the broker with. Needs stunnel4 and openssl: deploy/install-test-tools.sh."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest
from conftest import wait_until

from streamlstm.demo.broker import die_with_parent


class Certificates(NamedTuple):
    ca: Path  # signed the broker's certificate
    other_ca: Path  # signed nothing the broker shows
    cert: Path  # the broker's: CN and subjectAltName IP:127.0.0.1
    key: Path


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run deploy/install-test-tools.sh")
    return path


def openssl(*args: str | Path) -> None:
    subprocess.run([tool("openssl"), *map(str, args)], check=True, capture_output=True, timeout=60)


def self_signed_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A CA certificate and its key (EC P-256: generated in milliseconds, unlike RSA)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
            "-subj", f"/CN={name}", "-keyout", key, "-out", cert)
    return cert, key


def make_certificates(directory: Path) -> Certificates:
    ca, ca_key = self_signed_ca(directory, "test-ca")
    other_ca, _ = self_signed_ca(directory, "other-ca")
    request, cert, key = directory / "broker.csr", directory / "broker.pem", directory / "broker.key"
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", key, "-out", request)
    extensions = directory / "broker.ext"
    extensions.write_text("subjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\n")
    openssl("x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "2",
            "-extfile", extensions, "-out", cert)
    return Certificates(ca, other_ca, cert, key)


class TlsTerminator:
    """stunnel4 in the foreground (no pid file, no daemonising: it dies with us), TLS on `port`, plain
    bytes to `target_port`."""

    def __init__(self, directory: Path, certificates: Certificates, port: int, target_port: int) -> None:
        self.port = port
        self.certificates = certificates
        config = directory / "stunnel.conf"
        config.write_text(f"foreground = yes\npid =\n[kafka]\naccept = 127.0.0.1:{port}\n"
                          f"connect = 127.0.0.1:{target_port}\ncert = {certificates.cert}\n"
                          f"key = {certificates.key}\n")
        self.log_file = directory / "stunnel.log"
        self._process = subprocess.Popen([tool("stunnel4"), str(config)], stdout=open(self.log_file, "wb"),
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=die_with_parent)
        wait_until(self._listening, 20, f"stunnel listening on 127.0.0.1:{port}",
                   lambda: self.log_file.read_text(errors="replace"))

    def _listening(self) -> bool:
        if self._process.poll() is not None:
            raise AssertionError(f"stunnel exited ({self._process.returncode}):\n{self.log_file.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, cafile: Path | None = None) -> dict[str, object]:
        """kafka-python settings of a harness client that trusts `cafile` (the broker's CA by default)."""
        return {"bootstrap_servers": self.bootstrap, "security_protocol": "SSL",
                "ssl_cafile": str(cafile or self.certificates.ca)}

    def close(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)
