"""Log lines: readable text at a terminal, or one JSON object a line for a log collector (Loki,
Elasticsearch, Cloud Logging) to parse without patterns — `log.format: json`, as the Deployment runs."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone


class JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, fmt: str = "text", worker: int | None = None) -> None:
    """`worker`: a serve.workers worker's index, in each of its lines (the workers share the pod's log)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        process = "" if worker is None else f"worker-{worker} "
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {process}%(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    logging.captureWarnings(True)  # a library's warning is a log line too, in the same format
    if level != "DEBUG":  # kafka-python narrates every connection at INFO, and every refused one at WARNING
        logging.getLogger("kafka").setLevel(logging.WARNING)
        logging.getLogger("kafka.net.manager").setLevel(logging.ERROR)
