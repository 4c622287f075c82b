"""log.format: json — every line `streamlstm serve` writes is one JSON object that a log collector can
parse without patterns; a worker's lines name the worker, and a traceback stays inside its line."""

from __future__ import annotations

import json
import logging
import sys

from streamlstm.logs import JsonFormatter


def test_an_error_and_its_traceback_are_one_line_of_json():
    try:
        raise RuntimeError("broker refused\nrecords")
    except RuntimeError:
        record = logging.LogRecord("streamlstm.daemon", logging.ERROR, __file__, 1, "failed: %s", ("x",),
                                   sys.exc_info())
    line = JsonFormatter(worker=1).format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert (entry["level"], entry["logger"], entry["message"], entry["worker"]) == ("ERROR", "streamlstm.daemon",
                                                                                     "failed: x", 1)
    assert entry["exception"].startswith("Traceback") and "broker refused\nrecords" in entry["exception"]
    assert entry["time"].endswith("+00:00")  # ISO 8601, UTC


def test_a_pod_of_two_workers_logs_only_json_naming_each_worker(daemon_factory):
    daemon = daemon_factory(serve__workers=2, log__format="json").start()
    assert daemon.stop() == 0
    lines = [json.loads(line) for line in daemon.log_file.read_text().splitlines()]  # fails on any other line
    assert lines and all({"time", "level", "logger", "message"} <= entry.keys() for entry in lines)
    assert {entry.get("worker") for entry in lines if entry["logger"] == "streamlstm.daemon"} == {0, 1}
    supervisor = [entry for entry in lines if entry["logger"] == "streamlstm.workers" and "worker" not in entry]
    assert any(entry["message"] == "stopped" for entry in supervisor)
