"""serve.workers > 1: several daemon processes in one pod, supervised, behind the pod's one HTTP port.

Every worker is a Daemon in the consumer group, so Kafka spreads the input partitions over them as over
replicas, and each key's state follows its partition: N workers are as correct as N pods. Workers are
spawned, not forked (torch and CUDA are not fork-safe), and serve their own endpoints on 127.0.0.1.
The supervisor answers http.port for the pod: /metrics adds up the workers' values (prometheus-client's
multiprocess mode; process_* metrics describe one process, so they stay on each worker's own port: use
the container's metrics for the pod), /healthz and /readyz ask every worker. A worker that dies ends the
pod with exit code 1, so Kubernetes restarts it whole; SIGTERM stops every worker cleanly, and so does
the supervisor's own death.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Collection
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import cast
from urllib.parse import quote

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from ..config import Config
from ..signals import on_stop_signals
from .http_server import JSON, HttpServer
from .metrics import MULTIPROC_DIR

log = logging.getLogger("streamlstm.workers")  # a stable name: operators query logs by it (README)

ASK_TIMEOUT_S = 2.0  # per worker, well inside a probe's timeoutSeconds


Work = Callable[[Config, int, Connection], None]  # a worker process's body: config, index, pipe for its port


def serve_workers(cfg: Config, work: Work, load_model: Callable[[Config], None]) -> int:
    """Run cfg.serve.workers workers until SIGTERM or SIGINT (0), or until one dies (1).

    `work` and `load_model` come from worker.py through the CLI: this module never imports what loads
    torch, so neither does the supervisor's process.
    """
    check_model(cfg, load_model)
    directory, temporary = metrics_directory()
    supervisor = Supervisor(cfg, directory, work)
    wakeup = wake_on_stop_signals()
    supervisor.http.start()
    log.info("http on %s:%d (/metrics /healthz /readyz) for %d workers", cfg.http.host, supervisor.http.port,
             cfg.serve.workers)
    try:
        supervisor.start()
        return supervisor.supervise(wakeup)
    finally:
        supervisor.http.stop()
        if temporary:
            shutil.rmtree(directory, ignore_errors=True)


def check_model(cfg: Config, load_model: Callable[[Config], None]) -> None:
    """Fail once, before any worker starts, where every worker would (ConfigError, ArtifactError).

    In a child process that then exits: loading a model imports torch, which the supervisor never
    needs (~270 MB of memory for the pod's lifetime). The model is loaded on the CPU.
    """
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        child.submit(load_model, cfg).result()  # re-raises the child's error here


def metrics_directory() -> tuple[Path, bool]:
    """Where the workers write their metric values: PROMETHEUS_MULTIPROC_DIR emptied of an earlier run's
    files, or a new temporary directory (True: remove it at the end).

    Set in the environment before the workers start, so their prometheus-client picks multiprocess mode.
    """
    given = os.environ.get(MULTIPROC_DIR)
    if given:
        directory = Path(given)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):  # values of dead processes would be added to ours
            stale.unlink()
        return directory, False
    directory = Path(tempfile.mkdtemp(prefix="streamlstm-metrics-"))
    os.environ[MULTIPROC_DIR] = str(directory)
    return directory, True


def wake_on_stop_signals() -> int:
    """SIGTERM (Kubernetes) and SIGINT (Ctrl-C) write to the pipe whose read end this returns."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write)
    on_stop_signals(lambda: None)
    return read


def worker_config(cfg: Config, index: int) -> Config:
    """A worker's configuration: its endpoints on a free loopback port (the supervisor's is the pod's),
    under exactly_once a transactional id of its own (a shared one would fence the others), and under
    static membership a group instance id of its own (one instance id is one member of the group), and a
    local store directory of its own (worker-<index> under state.dir: each writes only its partitions')."""
    kafka = cfg.kafka
    if kafka.processing_guarantee == "exactly_once":
        kafka = dataclasses.replace(kafka, transactional_id=f"{kafka.transactional_id_or_default()}-{index}")
    if kafka.group_instance_id:
        kafka = dataclasses.replace(kafka, group_instance_id=f"{kafka.group_instance_id}-{index}")
    http = dataclasses.replace(cfg.http, host="127.0.0.1", port=0)
    state = dataclasses.replace(cfg.state, dir=str(cfg.state.dir_or_default() / f"worker-{index}"))
    return dataclasses.replace(cfg, kafka=kafka, http=http, state=state)


def ask(port: int, path: str) -> tuple[int, str]:
    """A worker's answer on one endpoint: status and body; 0 and why when it does not answer in time."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=ASK_TIMEOUT_S)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace").strip()
    except (OSError, http.client.HTTPException) as exc:
        return 0, f"no answer on {path} ({exc})"
    finally:
        connection.close()


class Supervisor:
    """The pod's workers, and its HTTP port answering for all of them."""

    def __init__(self, cfg: Config, directory: Path, work: Work) -> None:
        self.cfg = cfg
        self.work = work
        self.directory = directory
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=str(directory))
        self.procs: list[BaseProcess] = []
        self.pipes: dict[Connection, int] = {}  # to a worker that has not told its port yet -> its index
        self.ports: dict[int, int] = {}  # worker index -> its HTTP port, once its model is loaded
        self.http = HttpServer(cfg.http.host, cfg.http.port, lambda: generate_latest(self.registry),
                               self.healthy, self.ready, self.key)

    def start(self) -> None:
        spawn = multiprocessing.get_context("spawn")
        for index in range(self.cfg.serve.workers):
            receive, send = spawn.Pipe(duplex=False)
            # daemon: should the supervisor itself fail, multiprocessing stops the workers at its exit
            proc = spawn.Process(target=self.work, args=(worker_config(self.cfg, index), index, send),
                                 name=f"worker-{index}", daemon=True)
            proc.start()
            send.close()
            self.procs.append(proc)
            self.pipes[receive] = index
            log.info("worker %d started (pid %d)", index, proc.pid)

    def healthy(self) -> tuple[bool, str]:
        """Live while every worker runs and says it is live; a worker loading its model is live."""
        return self._ask_all("/healthz", loading_ok=True)

    def ready(self) -> tuple[bool, str]:
        """Ready when every worker is: one with partitions still restoring holds its keys back."""
        return self._ask_all("/readyz", loading_ok=False)

    def key(self, name: str) -> tuple[int, str, bytes]:
        """GET /keys/{key}: the worker that holds it answers; else 503 if one could not say (restoring,
        loading, not answering), else 404."""
        answers = [ask(self.ports[i], "/keys/" + quote(name, safe="")) if i in self.ports else (0, "loading")
                   for i in range(len(self.procs))]
        found = next((body for status, body in answers if status == 200), None)
        if found is not None:
            return 200, JSON, (found + "\n").encode()
        status = 503 if any(status != 404 for status, _ in answers) else 404
        return status, JSON, (json.dumps({"key": name, "workers": [{"status": s, "answer": b} for s, b in answers]})
                              + "\n").encode()

    def _ask_all(self, path: str, loading_ok: bool) -> tuple[bool, str]:
        if len(self.procs) < self.cfg.serve.workers:  # asked while they are being spawned
            return loading_ok, "starting the workers"
        for index, proc in enumerate(self.procs):
            if wait([proc.sentinel], 0):  # unlike is_alive(), safe beside the main thread's join
                return False, f"worker {index} exited"
            if index not in self.ports:
                if loading_ok:
                    continue
                return False, f"worker {index}: loading the model"
            status, detail = ask(self.ports[index], path)
            if status != 200:
                return False, f"worker {index}: {detail}"
        return True, f"ok: {len(self.procs)} workers"

    def supervise(self, wakeup: int) -> int:
        """Until a stop signal (every worker stopped: 0 if cleanly) or a worker's death (the others stopped: 1)."""
        deaths = {proc.sentinel: index for index, proc in enumerate(self.procs)}
        while True:
            ready = wait([wakeup, *deaths, *self.pipes])
            if wakeup in ready:
                log.info("stopping: SIGTERM to every worker")
                return self.stop()
            dead = [deaths[s] for s in ready if s in deaths]
            if dead:
                for index in dead:
                    proc = self.procs[index]
                    proc.join()
                    log.error("worker %d (pid %d) exited unexpectedly with code %s; stopping the others, the pod "
                              "restarts", index, proc.pid, proc.exitcode)
                self.stop(reported=dead)
                return 1
            for pipe in cast(list[Connection], ready):  # the rest are pipes
                index = self.pipes.pop(pipe)
                with contextlib.suppress(EOFError):  # it died before telling: its sentinel says so next
                    self.ports[index] = pipe.recv()

    def stop(self, reported: Collection[int] = ()) -> int:
        """SIGTERM to every worker, then wait: each checkpoints and leaves the group. 0 if all stopped cleanly;
        the others are logged, but for those `reported` already."""
        for proc in self.procs:
            proc.terminate()
        failed = False
        for index, proc in enumerate(self.procs):
            proc.join()
            mark_process_dead(proc.pid, str(self.directory))
            # -SIGTERM: ended by it before its handler was installed, so before it joined the group
            if proc.exitcode not in (0, -signal.SIGTERM):
                failed = True
                if index not in reported:
                    log.error("worker %d (pid %d) ended with exit code %s", index, proc.pid, proc.exitcode)
        log.info("stopped")
        return 1 if failed else 0
