"""The serving daemon: poll → decode → batched step → publish → checkpoint, with health and metrics.

One event's path: Transport.poll → EventDecoder.decode → plan_batch (reset, end, expiry) → Lane.step
(StreamingPredictor.advance on the lane's table) → prediction_record → Transport.send_prediction →
Checkpointer.checkpoint (state records, flush, commit). A shadow model steps the same plan in a lane of
its own (lane.py, models.py). Restorer rebuilds the state of partitions as they are assigned, and of
partitions sent back to their last commit because the broker refused some of their records (redo.py).
"""

from __future__ import annotations

import gc
import logging
import threading
import time

import numpy as np
import torch

from ..config import Config
from ..events import REASONS, Event, Rejection, encode_record, prediction_record
from ..model.artifact import Artifact, ArtifactError
from ..model.predictor import Advance, resolve_device
from ..transport import open_changelog, open_transport, prepare_topics
from ..transport.api import Record, TopicPartition, Transport, TransportError
from .backoff import BACKOFF_MAX_S, Backoff
from .checkpoint import Checkpointer, Outcome
from .http_server import HttpServer
from .lane import Lane, Steps
from .metrics import Metrics, observe_many
from .models import Models, load_models, shadow_dir
from .plan import Expiry, plan_batch
from .queries import Holding, KeyQueries
from ..state.resident import Admitted, ResidentKeys
from ..state.store import LocalStores
from .redo import Redo
from .restore import Restorer
from .watchdog import ProgressWatchdog, Verdict

log = logging.getLogger("streamlstm.daemon")  # a stable name: operators query logs by it (README)

# While a checkpoint is under way, each pass of the loop sends at least this many state records (about
# 5 ms of kafka-python sends), and at least as many as it handled events, so checkpoints keep pace.
STATE_RECORDS_PER_POLL = 128


def leaving(group_instance_id: str, session_timeout_ms: int) -> str:
    """What stopping does to the daemon's group membership."""
    if not group_instance_id:
        return "leaving the group"
    return (f"staying in the group as static member {group_instance_id!r} for {session_timeout_ms} ms: back by "
            "then, it gets its partitions again with no rebalance; otherwise they move to the others")


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.changelog_topic = cfg.state.changelog_for(cfg.kafka)
        self.metrics = Metrics(REASONS, (cfg.kafka.output_topic, cfg.kafka.dlq_topic, self.changelog_topic))
        self._stop = threading.Event()
        self._last_poll = time.monotonic()
        torch.set_num_threads(cfg.model.cpu_threads)
        self.device = resolve_device(cfg.model.device)
        artifact, shadow = load_models(cfg, self.device)
        self.models = Models(cfg, self.device, self.metrics, artifact, shadow)
        self.expiry = Expiry.from_config(cfg.state)
        state_dir = cfg.state.dir_or_default()
        self.lanes = [self._lane("primary", artifact, LocalStores(state_dir, self.changelog_topic), self.changelog_topic)]
        if shadow is not None:
            topic = cfg.state.changelog_for(cfg.kafka, shadow=True)
            self.lanes.append(self._lane("shadow", shadow, LocalStores(shadow_dir(state_dir), topic), topic))
        self._served(artifact)
        self.queries = KeyQueries()
        self.http = HttpServer(cfg.http.host, cfg.http.port, self.metrics.exposition, self.healthy, self.ready,
                               self.queries.ask)
        self._restorer: Restorer | None = None  # both once connected: see the properties below
        self._io: Transport | None = None
        self.backoff = Backoff()
        self.redo = Redo(self.backoff, self.metrics)
        self.watchdog = ProgressWatchdog(cfg.http.stall_timeout_s)
        log.info("model %s loaded from %s on %s", artifact.version, artifact.path, self.device)
        if shadow is not None:
            log.info("shadow model %s loaded from %s: stepped on the same events, its state in %s%s", shadow.version,
                     shadow.path, self.lanes[1].changelog_topic,
                     f", its predictions to {cfg.kafka.shadow_topic}" if cfg.kafka.shadow_topic else "")

    def _lane(self, role: str, artifact: Artifact, stores: LocalStores, topic: str) -> Lane:
        """A lane serving `artifact` from an empty table; its changelog reader comes once connected."""
        predictor = self.models.predictor(artifact)
        resident = ResidentKeys(predictor.table, stores, self.cfg.state.max_resident_keys if role == "primary" else 0,
                                (0, 0, None), artifact.version)
        lane = Lane(role, resident, stores, topic, (0, 0, None), artifact.version)
        self.models.put(lane, artifact, predictor)
        return lane

    @property
    def primary(self) -> Lane:
        return self.lanes[0]

    @property
    def resident(self) -> ResidentKeys:
        return self.primary.resident

    def _shadows(self) -> list[Lane]:
        """The shadow lanes that step: not one of the served version (promoted: idle)."""
        return [lane for lane in self.lanes[1:] if lane.version != self.primary.version]

    def _served(self, artifact: Artifact) -> None:
        """The event decoder and model info that go with the served model."""
        spec = artifact.spec
        self.decoder = artifact.decoder(self.cfg.events)
        self.metrics.model.info({"version": artifact.version, "task": spec.task, "device": str(self.device),
                                 "hidden_size": str(spec.hidden_size), "num_layers": str(spec.num_layers),
                                 "state_dtype": self.cfg.state.dtype})
        shadow = self.models.shadow
        if shadow is not None:
            self.metrics.shadow.info({"version": shadow.version, "hidden_size": str(shadow.spec.hidden_size),
                                      "num_layers": str(shadow.spec.num_layers),
                                      "stepping": str(shadow.version != artifact.version).lower()})

    def _holding(self) -> Holding:
        restorer = self.restorer
        shadows = self._shadows()
        return Holding(self.primary.table, self.resident, sorted(tp.partition for tp in restorer.assigned),
                       sorted(tp.partition for tp in restorer.restoring), self.primary.version,
                       self.cfg.http.expose_state, (shadows[0].table, shadows[0].version) if shadows else None)

    def healthy(self) -> tuple[bool, str]:
        """Live while the loop progresses; waiting for an unreachable broker is progress, not a hang."""
        if self._io is None:
            return True, "waiting for the Kafka cluster"
        now = time.monotonic()
        idle = now - self._last_poll
        if idle > self.cfg.http.liveness_timeout_s:
            return False, f"poll loop stalled for {idle:.0f} s"
        if self.watchdog.verdict is Verdict.FAILED:
            return False, (f"no records consumed for {self.watchdog.stalled_for(now):.0f} s while partitions lag "
                           f"{_partition_lags(self.watchdog.lagging)}; fetching them again did not help")
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """Ready once the first assignment's state is restored (an empty assignment counts: a standby)."""
        if self._restorer is None or not self._restorer.restored_once:
            return False, "waiting for partitions and their state"
        if self.backoff.failing:
            return False, "the broker refuses records; redoing partitions from their last commit"
        return True, f"ok: {len(self._restorer.assigned)} partitions"

    @property
    def io(self) -> Transport:
        if self._io is None:
            raise RuntimeError("no transport before run() has connected")
        return self._io

    @property
    def restorer(self) -> Restorer:
        if self._restorer is None:
            raise RuntimeError("no restorer before run() has connected")
        return self._restorer

    def stop(self) -> None:
        """Safe from a signal handler: the loop finishes its batch, checkpoints and leaves the group."""
        self._stop.set()

    def run(self) -> None:
        self.http.start()
        log.info("http on %s:%d (/metrics /healthz /readyz)", self.cfg.http.host, self.http.port)
        kafka = self.cfg.kafka
        io = self._connect()
        if io is None:
            self.http.stop()
            return
        for lane in self.lanes:
            lane.reader = open_changelog(kafka, lane.changelog_topic)
        self._restorer = Restorer(io, self.lanes, kafka.input_topic, self.metrics)
        self.checkpointer = Checkpointer(io, self.lanes, self.metrics, self.expiry)
        log.info("consuming %s as group %s from %s; state in %s and local stores in %s", kafka.input_topic,
                 kafka.group_id, kafka.bootstrap_servers, self.changelog_topic, self.primary.stores.directory)
        if kafka.processing_guarantee == "exactly_once":
            log.info("exactly_once: read_committed consumers see the outputs once per checkpoint, every %d ms "
                     "(state.checkpoint_interval_ms; Kafka Streams: 100 ms)", self.cfg.state.checkpoint_interval_ms)
        # Start-up leaves a few hundred thousand long-lived objects (torch, the model, the clients) that
        # every full garbage collection would walk again; the per-event garbage made those collections
        # cost a third of the events/s (docs/benchmarks.md). Frozen, they are never walked.
        gc.freeze()
        try:
            self._loop(io)
            log.info("stopping: final checkpoint, %s", leaving(kafka.group_instance_id, kafka.session_timeout_ms))
            if failed := self.checkpointer.checkpoint().failed:
                log.warning("input partitions %s stay uncommitted (the broker refused their records); their "
                            "next owner redoes them from their last commit", sorted(failed))
        finally:  # the transport first: leaving the group revokes, which stops the readers' restores
            self.models.close()
            io.close()
            for lane in self.lanes:
                lane.changelog.close()
                lane.stores.close()
            self.http.stop()
        log.info("stopped")

    def _connect(self) -> Transport | None:
        """Topics and clients, retried with backoff while the broker cannot be reached (None: stopped).

        A daemon that starts before its broker (a pod before Kafka) waits, alive and not ready.
        """
        kafka, last_error = self.cfg.kafka, ""
        while not self._stop.is_set():
            try:
                prepare_topics(kafka, [lane.changelog_topic for lane in self.lanes])
                self._io = open_transport(kafka, self)
                self.backoff.reset()
                return self._io
            except TransportError as exc:
                if type(exc.__cause__ or exc).__name__ != last_error:
                    log.warning("cannot reach the Kafka cluster at %s (%s); retrying with backoff up to %d s",
                                kafka.bootstrap_servers, exc, BACKOFF_MAX_S)
                    last_error = type(exc.__cause__ or exc).__name__
                self._wait(self.backoff.next())
        return None

    def _wait(self, seconds: float) -> None:
        """Sleep, staying live: a daemon waiting for its broker is not hung. A stop ends the wait."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            self._last_poll = time.monotonic()
            self._stop.wait(min(1.0, deadline - time.monotonic()))

    def _loop(self, io: Transport) -> None:
        interval = self.cfg.state.checkpoint_interval_ms / 1000
        next_checkpoint = time.monotonic() + interval
        checkpointer = self.checkpointer
        while not self._stop.is_set():
            self._last_poll = time.monotonic()
            self.metrics.last_poll.set_to_current_time()
            try:
                records = io.poll(0 if self.restorer.busy or checkpointer.writing else None)
                if records:
                    self.watchdog.consumed()
                records = self.redo.held_back(io, records)
                if records:
                    self._process(io, records)
                self.restorer.step()
                self.queries.answer_all(self._holding)
                if self.resident.limit and (failed := self.primary.stores.take_failures()):
                    self._restore_anew(failed)
                self._reload()
                if checkpointer.writing:
                    if checkpointer.write(max(STATE_RECORDS_PER_POLL, len(records))):
                        self._checkpointed(checkpointer.finish(wait=False))
                elif time.monotonic() >= next_checkpoint:
                    self._begin_checkpoint()
                    self._report_lag(io)
                    self.metrics.stored_keys.set(self.primary.stores.stored_keys())
                    next_checkpoint = time.monotonic() + interval
            except TransportError as exc:  # a broker that does not answer: sends never raise, these calls may
                delay = self.backoff.next()
                log.warning("Kafka call failed (%r); retrying in %.0f s", exc, delay)
                self._wait(delay)

    def _begin_checkpoint(self) -> None:
        """At least once: a snapshot, written a slice per poll. Exactly once: a whole checkpoint, since
        every output sent before its commit joins its transaction, later events' ones included."""
        if self.cfg.kafka.processing_guarantee == "exactly_once":
            self._checkpoint()
        else:
            self.checkpointer.begin()

    def _checkpoint(self) -> None:
        """A whole checkpoint now."""
        self._checkpointed(self.checkpointer.checkpoint())

    def _checkpointed(self, outcome: Outcome) -> None:
        if outcome.failed:
            self.redo.rewind(self.io, self.restorer, outcome.failed)
        else:
            self.redo.committed(self.io, self.restorer.assigned, outcome.committed)

    def _reload(self) -> None:
        """Swap in a newer model (the primary's or the shadow's) between two steps, or report one that
        failed to load and keep serving. A checkpoint first, so a replay after a crash never crosses the
        swap; what the swap does to the keys' state: serving/models.py."""
        models = self.models
        for role, watcher in (("primary", models.watcher), ("shadow", models.shadow_watcher)):
            loaded = None if watcher is None else watcher.poll()
            lane = self.primary if role == "primary" else self.lanes[-1]
            if isinstance(loaded, ArtifactError) or (loaded is not None and models.refused(loaded, role)):
                reason = loaded if isinstance(loaded, ArtifactError) else models.refused(loaded, role)
                self.metrics.reloads.labels("failed").inc()
                log.error("%s model reload failed, still serving %s: %s", role, lane.version, reason)
            elif loaded is not None and loaded.version != lane.version:
                self._checkpoint()
                old = lane.version
                if role == "primary":
                    became = models.swap_primary(loaded, lane, self.lanes[1] if len(self.lanes) > 1 else None)
                else:
                    models.swap_shadow(loaded, lane)
                    became = "started from zero"
                self._served(models.primary)
                self.metrics.reloads.labels("swapped").inc()
                self.metrics.live_keys.set(len(self.primary.table))
                log.info("%s model %s swapped in from %s (was %s); keys' state %s", role, loaded.version, loaded.path,
                         old, became)

    # Rebalance callbacks: on kafka-python's IO thread, while the loop above waits inside poll().
    def on_revoked(self, partitions: set[TopicPartition]) -> None:
        self.restorer.on_revoked(partitions)
        self.checkpointer.on_revoked(partitions)
        self.redo.release(partitions)

    def on_assigned(self, partitions: set[TopicPartition]) -> None:
        if not self.restorer.on_assigned(partitions):
            return
        self.metrics.rebalances.inc()
        self.metrics.assigned.set(len(partitions))
        self.metrics.lag.clear()
        log.info("assigned partitions %s", sorted(tp.partition for tp in partitions))

    def on_lost(self, partitions: set[TopicPartition]) -> None:
        self.metrics.partitions_lost.inc(len(partitions))
        self.restorer.on_lost(partitions)
        self.checkpointer.forget(partitions)  # a snapshot under way must not commit them for their new owner
        self.redo.release(partitions)
        self.io.abort()
        self.io.forget(partitions)
        log.warning("lost partitions %s without committing (group membership lost); their state is dropped "
                    "and will be restored by their new owner", sorted(tp.partition for tp in partitions))

    def _process(self, io: Transport, records: list[Record]) -> None:
        m = self.metrics
        m.events_consumed.inc(len(records))
        m.poll_records.observe(len(records))
        accepted: list[tuple[Record, Event]] = []
        for record in records:
            decoded = self.decoder.decode(record.key, record.value)
            if isinstance(decoded, Rejection):
                io.send_dead_letter(record, decoded.reason, decoded.detail)
                m.rejected.labels(decoded.reason).inc()
            else:
                accepted.append((record, decoded))
                if decoded.replaced:
                    m.replaced.inc(decoded.replaced)
        if accepted and (failed := self._apply(io, accepted)):
            records = [record for record in records if record.partition not in failed]
        io.mark_done(records)

    def _apply(self, io: Transport, accepted: list[tuple[Record, Event]]) -> set[int]:
        """Step the accepted events and publish their predictions; returns the partitions left undone
        (their local store failed while their evicted keys were fetched: they are restored anew)."""
        m = self.metrics
        keys = [(record.partition, event.key) for record, event in accepted]
        admitted = self.resident.admit(keys)
        failed = set() if admitted is None else self._admitted(admitted)
        if failed:
            accepted = [(record, event) for record, event in accepted if record.partition not in failed]
            keys = [(record.partition, event.key) for record, event in accepted]
        plan = plan_batch(keys, [event for _, event in accepted], [record.offset for record, _ in accepted],
                          [record.timestamp for record, _ in accepted], self.primary.table.time_of, self.expiry,
                          int(time.time() * 1000))
        serving = [self.primary, *self._shadows()]
        if plan.steps:
            stepping = [accepted[i] for i in plan.steps]
            steps = Steps([keys[i] for i in plan.steps], plan.features, np.array(plan.fresh),
                          np.array([r.offset for r, _ in stepping], dtype=np.int64), np.array(plan.times, dtype=np.int64),
                          [event for _, event in stepping])
            result = self.primary.step(steps)
            for size, seconds in result.step_stats:
                m.step_batch.observe(size)
                m.step_duration.observe(seconds)
            self._publish(io, stepping, result, self.primary.version, shadow=False)
            for shadow in serving[1:]:
                advanced = shadow.step(steps)
                m.shadow_predictions.inc(len(stepping))
                if self.cfg.kafka.shadow_topic:
                    self._publish(io, stepping, advanced, shadow.version, shadow=True)
            record_ms = np.array([r.timestamp for r, _ in stepping], dtype=np.float64)
            observe_many(m.latency, np.maximum(time.time() * 1000 - record_ms, 0.0) / 1000)
            m.predictions.inc(len(stepping))
        for lane in serving:
            lane.table.drop(plan.tombstones.keys(), plan.tombstones.values())
        for reason, count in plan.dropped.items():
            m.dropped_keys.labels(reason).inc(count)
        m.live_keys.set(len(self.primary.table))
        return failed

    @staticmethod
    def _publish(io: Transport, stepping: list[tuple[Record, Event]], result: Advance, version: str,
                 shadow: bool) -> None:
        for (record, event), prediction, step in zip(stepping, result.predictions.tolist(), result.steps.tolist()):
            event_ts = record.timestamp if event.ts is None else event.ts
            published = prediction_record(event, prediction, step, version,
                                          (record.topic, record.partition, record.offset), event_ts)
            io.send_prediction(record, encode_record(published), shadow)

    def _admitted(self, admitted: Admitted) -> set[int]:
        """The metrics of making a batch's keys resident; the partitions whose store failed, restored anew."""
        m = self.metrics
        if admitted.hits or admitted.misses:
            m.evictions.inc(admitted.evicted)
            m.fetches.labels("hit").inc(admitted.hits)
            m.fetches.labels("miss").inc(admitted.misses)
            m.fetch_duration.observe(admitted.seconds)
        if admitted.failed:
            self._restore_anew(admitted.failed)
        return admitted.failed

    def _restore_anew(self, partitions: set[int]) -> None:
        """Partitions whose local store failed with keys evicted to it: their state is gone from this pod, so
        they go back to their last commit and restore from the changelog (the durable copy)."""
        log.error("local stores of partitions %s failed while keys were evicted to them (see above); they go back "
                  "to their last commit and restore from the changelog", sorted(partitions))
        lost = {tp for tp in self.restorer.assigned if tp.partition in partitions}
        self.restorer.rewind(lost, 0.0)
        self.metrics.rewinds.inc(len(lost))

    def _report_lag(self, io: Transport) -> None:
        """The lag metric, and the watchdog's check of the partitions records are expected from."""
        lags = io.lag()
        for tp, lag in lags.items():
            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(lag)
        expected = self.restorer.assigned - self.restorer.restoring - self.redo.reached
        verdict = self.watchdog.check(time.monotonic(), {tp: lags.get(tp) for tp in expected})
        if verdict is Verdict.STALLED:
            self._refetch(io)
        elif verdict is Verdict.FAILED:
            log.error("still no records from partitions with lag %s after fetching them again; /healthz fails so "
                      "that the pod is restarted", _partition_lags(self.watchdog.lagging))

    def _refetch(self, io: Transport) -> None:
        """A stalled consumer's one recovery attempt: each lagging partition sought to its own position,
        which drops what the client has in flight for it and fetches it anew."""
        lagging = self.watchdog.lagging
        self.metrics.stalls.inc()
        log.warning("no records consumed for %.0f s (http.stall_timeout_s) while partitions lag %s: the broker "
                    "stopped delivering them; fetching them again", self.watchdog.timeout_s, _partition_lags(lagging))
        for tp in lagging:
            position = io.position(tp)
            if position is not None:
                io.seek(tp, position)


def _partition_lags(lags: dict[TopicPartition, int]) -> str:
    return ", ".join(f"{tp.partition}: {lag}" for tp, lag in sorted(lags.items()))
