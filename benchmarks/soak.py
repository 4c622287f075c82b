"""Soak (issue 20): one daemon under live traffic for half an hour, watched for leaks every 10 s.

On the embedded broker (Tansu, memory storage, same machine), with a H=64, 2-layer model (random
weights) in a watched model directory:

  1. calibration: `--calibrate-events` (100 000) events over 10 000 keys produced beforehand and drained
     by a daemon: the backlog rate. The soak's rate is half of it (or `--rate`);
  2. the soak: `--minutes` (30) of events at that steady rate from a paced producer, over a sliding
     window of `--window-keys` (5 000) keys that moves on by `--churn` (10) keys a second: new keys
     arrive, those left behind go idle and expire under `state.ttl_seconds` (`--ttl`, 60 s, processing
     time). A new model version is written every `--reload-every` (600) s (hot reload, keep_state);
  3. every `--sample-every` (10) s: the daemon's RSS, threads and open files (/proc), its live keys and
     consumer lag (/metrics), the live keys expected (keys sent within the TTL), and the p50/p99 of the
     predictions read meanwhile (the prediction's CreateTime minus its event's timestamp).

It passes when, after the warm-up (`--warmup-minutes`, 10), RSS grows by less than 5 % over the rest
(least-squares slope x span), threads by less than 1.5 and open files by less than 5, live keys
stay within 10 % of the expected ones (median), and every event produced was predicted at least once.
A JSON report and a PNG plot (matplotlib: `pip install matplotlib`).

    python benchmarks/soak.py --out benchmarks/results/soak.json --plot docs/soak.png
    python benchmarks/soak.py --minutes 2 --warmup-minutes 0.5 --reload-every 45 --out /tmp/soak.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import msgspec
import numpy as np
from confluent_kafka import Producer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from e2e_bench import Daemon, Outputs, events_per_second, make_model, metric, produce_backlog, scrape  # noqa: E402
from machine import machine  # noqa: E402

from streamlstm.config import KafkaConfig  # noqa: E402
from streamlstm.demo.broker import EmbeddedBroker  # noqa: E402
from streamlstm.transport.admin import ensure_topics  # noqa: E402

HIDDEN, LAYERS, PARTITIONS = 64, 2, 4


def topics_named(name: str) -> dict[str, str]:
    return {"input": f"events-{name}", "serve": f"predictions-{name}", "dlq": f"dlq-{name}"}


def create(bootstrap: str, topics: dict[str, str]) -> None:
    ensure_topics(KafkaConfig(bootstrap_servers=bootstrap, input_topic=topics["input"], output_topic=topics["serve"],
                              dlq_topic=topics["dlq"], topic_partitions=PARTITIONS))


def event(key: int, rng: random.Random) -> tuple[bytes, bytes]:
    return f"device-{key}".encode(), b'{"features":[%.3f,%.3f,%.1f]}' % (rng.gauss(10, 3), rng.gauss(20, 5),
                                                                          rng.randrange(24))


def calibrate(bootstrap: str, tmp: Path, models: Path, overrides: list[str], events: int) -> float:
    """Backlog events/s: a daemon draining events produced before it started."""
    topics = topics_named("calibrate")
    create(bootstrap, topics)
    rng = random.Random(1)
    produce_backlog(bootstrap, topics["input"], [event(rng.randrange(10_000), rng) for _ in range(events)])
    outputs = Outputs(bootstrap, topics["serve"])
    daemon = Daemon(tmp, bootstrap, topics, "calibrate", models, overrides, None)
    try:
        rate = events_per_second(outputs.read(events))["events_per_s"]
    finally:
        daemon.stop()
        outputs.consumer.close()
    return rate


@dataclass
class Traffic:
    """The paced producer's keys: a window of `window` keys that moves on `churn` keys a second."""

    rate: float
    window: int
    churn: float
    ttl_s: float
    sent: int = 0
    last_sent: dict[int, float] = field(default_factory=dict)  # key -> when (monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def expected_live(self, now: float) -> int:
        with self.lock:
            return sum(t > now - self.ttl_s for t in self.last_sent.values())

    def run(self, bootstrap: str, topic: str, until: float, stop: threading.Event) -> None:
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "queue.buffering.max.messages": 1_000_000})
        rng, start = random.Random(7), time.monotonic()
        while not stop.is_set() and (now := time.monotonic()) < until:
            due = int((now - start) * self.rate) - self.sent
            base = int((now - start) * self.churn)
            for _ in range(due):
                key = base + rng.randrange(self.window)
                k, v = event(key, rng)
                producer.produce(topic, v, k)
                with self.lock:
                    self.last_sent[key] = now
            self.sent += max(due, 0)
            producer.poll(0)
            time.sleep(0.005)
        producer.flush(30)


class Predictions:
    """Reads the soak's predictions as they come: which (partition, offset) were predicted, and the
    latencies since the last sample."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.outputs = Outputs(bootstrap, topic, fetch_wait_ms=500)
        self.seen: set[tuple[int, int]] = set()
        self.latencies: list[float] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        decode = msgspec.json.decode
        while not self.stop.is_set():
            batch = self.outputs._poll(100_000, 0.2)
            with self.lock:
                for r in batch:
                    body = decode(r.value)
                    self.seen.add((body["source"]["partition"], body["source"]["offset"]))
                    self.latencies.append(r.timestamp - body["event_ts"])

    def take_latencies(self) -> list[float]:
        with self.lock:
            out, self.latencies = self.latencies, []
        return out

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.outputs.consumer.close()


def proc_figures(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return {"rss_mb": round(rss_kb / 1024, 1), "threads": len(list(Path(f"/proc/{pid}/task").iterdir())),
            "open_files": len(list(Path(f"/proc/{pid}/fd").iterdir()))}


def sample(daemon: Daemon, traffic: Traffic, predictions: Predictions, started: float) -> dict[str, float]:
    now = time.monotonic()
    text = scrape(daemon.port)
    lags = [float(v) for v in re.findall(r"^streamlstm_consumer_lag\{.*\} (\S+)$", text, re.MULTILINE)]
    latencies = predictions.take_latencies()
    p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (float("nan"), float("nan"))
    return {"t_s": round(now - started, 1), **proc_figures(daemon.proc.pid),
            "live_keys": metric(text, "streamlstm_live_keys"), "expected_live_keys": traffic.expected_live(now),
            "lag": sum(lags), "p50_ms": round(float(p50), 1), "p99_ms": round(float(p99), 1),
            "predictions": len(latencies), "sent": traffic.sent,
            "reloads": metric(text, 'streamlstm_model_reloads_total{result="swapped"}')}


def verdict(samples: list[dict[str, float]], warmup_s: float) -> dict[str, object]:
    """Flat after the warm-up: fitted over the rest (least-squares slope x span), RSS grows by less than
    5 %, threads by less than 1.5 and open files by less than 5; live keys within 10 % of the expected
    ones (median of the relative error)."""
    after = [s for s in samples if s["t_s"] >= warmup_s]
    if len(after) < 3:
        return {"passed": False, "why": "too few samples after the warm-up"}
    t = np.array([s["t_s"] for s in after])

    def growth(name: str) -> float:
        return round(float(np.polyfit(t, [s[name] for s in after], 1)[0] * (t[-1] - t[0])), 2)

    key_error = float(np.median([abs(s["live_keys"] - s["expected_live_keys"]) / max(s["expected_live_keys"], 1)
                                 for s in after]))
    checks = {"rss_growth_mb": growth("rss_mb"),
              "rss_growth_limit_mb": round(0.05 * float(np.median([s["rss_mb"] for s in after])), 1),
              "threads_growth": growth("threads"), "open_files_growth": growth("open_files"),
              "live_keys_median_error": round(key_error, 3)}
    passed = (checks["rss_growth_mb"] < checks["rss_growth_limit_mb"] and checks["threads_growth"] < 1.5
              and checks["open_files_growth"] < 5 and key_error <= 0.10)
    return {"passed": bool(passed), **checks}


def plot(samples: list[dict[str, float]], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the plot needs matplotlib: pip install matplotlib (or leave out --plot)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s["t_s"] / 60 for s in samples]
    panels = [("RSS (MB)", ["rss_mb"]), ("threads, open files", ["threads", "open_files"]),
              ("live keys", ["live_keys", "expected_live_keys"]), ("latency (ms)", ["p50_ms", "p99_ms"]),
              ("consumer lag (records)", ["lag"])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 11), sharex=True)
    for ax, (label, names) in zip(axes, panels):
        for name in names:
            ax.plot(minutes, [s[name] for s in samples], label=name)
        ax.set_ylabel(label)
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("minutes")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--warmup-minutes", type=float, default=10)
    p.add_argument("--rate", type=float, help="events/s (default: half the calibrated backlog rate)")
    p.add_argument("--calibrate-events", type=int, default=100_000)
    p.add_argument("--window-keys", type=int, default=5_000)
    p.add_argument("--churn", type=float, default=10.0, help="keys/s the window moves on")
    p.add_argument("--ttl", type=float, default=60.0, help="state.ttl_seconds")
    p.add_argument("--reload-every", type=float, default=600.0, help="seconds between new model versions")
    p.add_argument("--sample-every", type=float, default=10.0)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a config override for the daemons, repeatable (e.g. kafka.client=confluent)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/soak.json"))
    p.add_argument("--plot", type=Path)
    return p.parse_args()


def soak(args: argparse.Namespace, bootstrap: str, tmp: Path, models: Path, overrides: list[str],
         rate: float) -> tuple[list[dict[str, float]], dict[str, object]]:
    topics = topics_named("soak")
    create(bootstrap, topics)
    predictions = Predictions(bootstrap, topics["serve"])
    daemon = Daemon(tmp, bootstrap, topics, "soak", models, overrides + [
        f"state.ttl_seconds={args.ttl}", "state.ttl_clock=processing_time", "log.level=INFO"], None)
    daemon.wait_ready()
    traffic = Traffic(rate, args.window_keys, args.churn, args.ttl)
    stop = threading.Event()
    started = time.monotonic()
    producer = threading.Thread(target=traffic.run, args=(bootstrap, topics["input"], started + args.minutes * 60, stop),
                                daemon=True)
    producer.start()
    samples: list[dict[str, float]] = []
    versions = 1
    try:
        while producer.is_alive():
            time.sleep(max(0.0, started + (len(samples) + 1) * args.sample_every - time.monotonic()))
            samples.append(sample(daemon, traffic, predictions, started))
            print(json.dumps(samples[-1]), flush=True)
            if time.monotonic() - started >= versions * args.reload_every:
                versions += 1
                make_model(models / f"v{versions}", HIDDEN, LAYERS, seed=versions)
        deadline = time.monotonic() + 120
        while len(predictions.seen) < traffic.sent and time.monotonic() < deadline:
            time.sleep(0.5)
        samples.append(sample(daemon, traffic, predictions, started))
    finally:
        stop.set()
        daemon.stop()
        predictions.close()
    lost = traffic.sent - len(predictions.seen)
    return samples, {"sent": traffic.sent, "predicted_distinct": len(predictions.seen), "lost": lost,
                     "model_versions_written": versions}


def main() -> None:
    args = parse_args()
    overrides = ["model.device=cpu", *args.set]
    with tempfile.TemporaryDirectory(prefix="streamlstm-soak-") as tmp_dir, EmbeddedBroker() as broker:
        tmp = Path(tmp_dir)
        models = tmp / "models"
        make_model(models / "v1", HIDDEN, LAYERS, seed=1)
        backlog = None if args.rate else calibrate(broker.bootstrap, tmp, models, overrides, args.calibrate_events)
        rate = args.rate or backlog / 2
        print(f"soak at {rate:.0f} events/s (backlog rate {backlog})", flush=True)
        samples, counts = soak(args, broker.bootstrap, tmp, models, overrides, rate)
    result = verdict(samples, args.warmup_minutes * 60)
    result["passed"] = bool(result["passed"]) and counts["lost"] == 0
    report = {"benchmark": "soak", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv), "machine": machine(), "rate_per_s": round(rate, 1),
              "backlog_rate_per_s": backlog, "settings": vars(args) | {"out": str(args.out), "plot": str(args.plot)},
              **counts, "verdict": result, "samples": samples}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot(samples, args.plot, f"soak: {rate:.0f} events/s, {args.minutes:g} min, TTL {args.ttl:g} s, "
                                 f"{args.window_keys} keys moving {args.churn:g}/s; passed: {result['passed']}")
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))
    if not result["passed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
