"""Stop signals: SIGTERM (Kubernetes) and SIGINT (Ctrl-C) both mean: finish cleanly."""

from __future__ import annotations

import signal
from collections.abc import Callable


def on_stop_signals(stop: Callable[[], None]) -> None:
    """Call `stop` on SIGTERM or SIGINT (from the main thread, between two Python bytecodes)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop())
