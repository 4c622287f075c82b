"""serve.workers > 1: what runs in each worker process, and the supervisor's model check.

Kept apart from supervisor.py so that the supervisor's process never imports what loads torch: the CLI
hands these two functions to the supervisor, which runs them only in spawned children.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from multiprocessing.connection import Connection, wait

from ..config import Config
from ..logs import configure_logging
from ..signals import on_stop_signals

log = logging.getLogger("streamlstm.workers")  # a stable name: operators query logs by it (README)


def load_model(cfg: Config) -> None:
    """The supervisor's check, in a child that then exits: loads the model as a worker would, on the CPU."""
    from ..model.predictor import resolve_device
    from .models import load_models

    resolve_device(cfg.model.device)
    load_models(cfg)


def work(cfg: Config, index: int, port_to: Connection) -> None:
    """A worker process: a Daemon that tells the supervisor its HTTP port, then runs until SIGTERM."""
    from .daemon import Daemon  # torch with it: in the workers only

    configure_logging(cfg.log.level, cfg.log.format, index)
    stopped = threading.Event()
    on_stop_signals(stopped.set)  # a stop while the model loads still counts
    threading.Thread(target=stop_with_supervisor, name="supervisor-watch", daemon=True).start()
    daemon = Daemon(cfg)
    with contextlib.suppress(OSError):  # a supervisor gone meanwhile: stop_with_supervisor stops us
        port_to.send(daemon.http.port)  # bound in Daemon(): known before run()
    port_to.close()
    on_stop_signals(daemon.stop)
    if stopped.is_set():
        daemon.stop()
    daemon.run()


def stop_with_supervisor() -> None:
    """A supervisor killed outright (SIGKILL, the OOM killer) cannot stop its workers; left running they
    would serve on as orphans beside the supervisor's replacement. Each worker watches its parent and, once
    it is gone, stops itself as on SIGTERM: a last checkpoint, then it leaves the group."""
    parent = multiprocessing.parent_process()
    assert parent is not None, "a worker is spawned by the supervisor"
    wait([parent.sentinel])
    log.error("the supervisor (pid %d) is gone; stopping", parent.pid)
    os.kill(os.getpid(), signal.SIGTERM)
