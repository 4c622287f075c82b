"""Crash points: a kill -9 of the daemon at a named moment, for the tests that prove what such a crash
leaves behind (a local-store write cut short, a commit without its local write). Set
STREAMLSTM_CRASH_AT=name or name:n (the n-th time that point is reached); unset, a point costs a compare.
"""

from __future__ import annotations

import os
import signal

_name, _, _nth = os.environ.get("STREAMLSTM_CRASH_AT", "").partition(":")
_left = int(_nth or 1)


def crash_point(name: str) -> None:
    global _left
    if name == _name:
        _left -= 1
        if _left == 0:
            os.kill(os.getpid(), signal.SIGKILL)
