"""The serving daemon: poll → decode → batched step → publish → checkpoint, with health and metrics.

One event's path: KafkaIO.poll → EventDecoder.decode → StreamingPredictor.advance →
encode_prediction → KafkaIO.send_prediction → KafkaIO.checkpoint (flush, then commit).
"""

from __future__ import annotations

import logging
import threading
import time

import torch
from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from .artifact import load_artifact
from .config import Config
from .events import EventDecoder, Rejection, encode_record, prediction_record
from .http_server import HttpServer
from .kafka_io import KafkaIO, ensure_topics
from .metrics import Metrics
from .predictor import StreamingPredictor, resolve_device

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self._stop = threading.Event()
        self._last_poll = time.monotonic()
        self._assigned: set[TopicPartition] = set()
        torch.set_num_threads(cfg.model.cpu_threads)
        device = resolve_device(cfg.model.device)
        artifact = load_artifact(cfg.model.path, device)
        self.predictor = StreamingPredictor(artifact, device)
        self.decoder = EventDecoder(artifact.spec.features)
        spec = artifact.spec
        self.metrics.model.info({"version": artifact.version, "task": spec.task, "device": str(device),
                                 "hidden_size": str(spec.hidden_size), "num_layers": str(spec.num_layers)})
        self.http = HttpServer(cfg.http.host, cfg.http.port, self.metrics.exposition, self.healthy, self.ready)
        log.info("model %s loaded from %s on %s", artifact.version, cfg.model.path, device)

    def healthy(self) -> tuple[bool, str]:
        idle = time.monotonic() - self._last_poll
        if idle > self.cfg.http.liveness_timeout_s:
            return False, f"poll loop stalled for {idle:.0f} s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if not self._assigned:
            return False, "no partitions assigned yet"
        return True, f"ok: {len(self._assigned)} partitions"

    def stop(self) -> None:
        """Safe from a signal handler: the loop finishes its batch, checkpoints and leaves the group."""
        self._stop.set()

    def run(self) -> None:
        self.http.start()
        log.info("http on %s:%d (/metrics /healthz /readyz)", self.cfg.http.host, self.http.port)
        kafka = self.cfg.kafka
        if kafka.create_topics:
            ensure_topics(kafka)
        io = KafkaIO(kafka, self._on_assign)
        log.info("consuming %s as group %s from %s", kafka.input_topic, kafka.group_id, kafka.bootstrap_servers)
        try:
            next_commit = time.monotonic() + kafka.commit_interval_ms / 1000
            while not self._stop.is_set():
                self._last_poll = time.monotonic()
                self.metrics.last_poll.set_to_current_time()
                records = io.poll()
                if records:
                    self._process(io, records)
                if time.monotonic() >= next_commit:
                    self._checkpoint(io)
                    next_commit = time.monotonic() + kafka.commit_interval_ms / 1000
            log.info("stopping: final checkpoint, leaving the group")
        finally:
            io.close()
            self.http.stop()
        log.info("stopped")

    def _on_assign(self, partitions: set[TopicPartition]) -> None:
        self._assigned = partitions
        self.metrics.rebalances.inc()
        self.metrics.assigned.set(len(partitions))
        log.info("assigned partitions %s", sorted(tp.partition for tp in partitions))

    def _process(self, io: KafkaIO, records: list[ConsumerRecord]) -> None:
        m = self.metrics
        m.events_consumed.inc(len(records))
        m.poll_records.observe(len(records))
        accepted, events = [], []
        for record in records:
            decoded = self.decoder.decode(record.key, record.value)
            if isinstance(decoded, Rejection):
                io.send_dead_letter(record, decoded.reason, decoded.detail)
                m.rejected.labels(decoded.reason).inc()
            else:
                accepted.append(record)
                events.append(decoded)
        if events:
            predictions, steps = self.predictor.advance([e.key for e in events], [e.features for e in events])
            for size, seconds in self.predictor.step_stats:
                m.step_batch.observe(size)
                m.step_duration.observe(seconds)
            version = self.predictor.version
            for record, event, prediction, step in zip(accepted, events, predictions.tolist(), steps.tolist()):
                source = (record.topic, record.partition, record.offset)
                event_ts = record.timestamp if event.ts is None else event.ts
                published = prediction_record(event, prediction, step, version, source, event_ts)
                io.send_prediction(record.key, encode_record(published))
            now_ms = time.time() * 1000
            for record in accepted:
                m.latency.observe(max(now_ms - record.timestamp, 0.0) / 1000)
            m.predictions.inc(len(events))
            m.live_keys.set(len(self.predictor.table))
        io.mark_done(records)

    def _checkpoint(self, io: KafkaIO) -> None:
        started = time.perf_counter()
        if io.checkpoint():
            self.metrics.commits.inc()
            self.metrics.commit_duration.observe(time.perf_counter() - started)
        for tp, lag in io.lag().items():
            self.metrics.lag.labels(tp.topic, str(tp.partition)).set(lag)
