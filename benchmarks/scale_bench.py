"""State at scale through the daemon (issue 19): a million keys served, restarted and moved.

One run per `--client` (default both: kafka-python, then confluent), each on a fresh embedded broker
(Tansu, memory storage, on the same machine), with a model of `--hidden` (64) units and `--layers` (2)
layers (random weights), `--partitions` (4) input partitions, the daemon's default configuration
otherwise (5 s checkpoints):

  1. throughput, few keys: `--events` (2 000 000) events over `--few-keys` (10 000) keys drawn
     uniformly, produced before the daemon starts, drained by `streamlstm serve`;
  2. throughput, many keys: as many events over `--keys` (1 000 000) distinct keys, every key once in a
     shuffled order and then once more in another (two events each), drained by a daemon of another
     group. Nearly every event changes a key no other event of its checkpoint changes: each checkpoint
     writes about as many state records as it covers events. The figure the issue asks for is
     many-keys events/s over few-keys events/s, ≥ 0.5;
  3. restart on the same state.dir: that daemon is stopped (SIGTERM: a final checkpoint, its local
     stores written) and started again as the same member with the same state.dir; timed from its
     first assignment (its log line, millisecond timestamps) to /readyz answering 200 (polled every
     10 ms), with where its keys came from (streamlstm_restored_keys_total by source) and how many
     changelog records it replayed;
  4. a new owner: stopped again, and a daemon with an empty state.dir joins the same group: every key
     restored from the changelog; timed the same way, keys/s over that span.

Events/s is the count of predictions over the span of their timestamps (first to last), so start-up
and the group join are left out; every prediction is counted, a shortfall fails the run. The daemon's
own checkpoint figures come from its metrics once the backlog is drained: state records written, and
checkpoint time (begin to the commit, the flush of every record included) per state record.

Run from the repository root (about 15 minutes on 2 cores for both clients):

    python benchmarks/scale_bench.py
    python benchmarks/scale_bench.py --client confluent --keys 100000 --events 200000 --out /tmp/scale.json
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from confluent_kafka import Producer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bare_clients import FEATURE_MEAN, FEATURE_STD  # noqa: E402
from e2e_bench import BROKER, Daemon, Outputs, events_per_second, make_model, metric, scrape  # noqa: E402
from machine import machine  # noqa: E402

from streamlstm.config import KafkaConfig  # noqa: E402
from streamlstm.demo.broker import EmbeddedBroker  # noqa: E402
from streamlstm.transport.admin import ensure_topics  # noqa: E402

CLIENTS = ("kafka-python", "confluent")
ASSIGNED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO streamlstm.daemon: assigned partitions", re.M)
READY_TIMEOUT_S = 600.0


def key_order(events: int, keys: int, seed: int) -> np.ndarray:
    """Uniform keys when there are fewer keys than events / 2; otherwise every key once, shuffled, and
    again (as many rounds as the events allow)."""
    rng = np.random.default_rng(seed)
    if keys * 2 >= events:
        return np.concatenate([rng.permutation(keys) for _ in range(-(-events // keys))])[:events]
    return rng.integers(0, keys, events)


def produce(bootstrap: str, topic: str, ids: np.ndarray, seed: int) -> None:
    """Wire-format events (event time: the record's timestamp) on librdkafka, the fastest producer here."""
    x = np.random.default_rng(seed).standard_normal((len(ids), len(FEATURE_MEAN))) * FEATURE_STD + FEATURE_MEAN
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.size": 1_000_000,
                         "queue.buffering.max.messages": 1_000_000})
    for k, row in zip(ids.tolist(), x.tolist()):
        value = b'{"features":[%.4f,%.4f,%.4f]}' % tuple(row)
        while True:
            try:
                producer.produce(topic, value, b"meter-%07d" % k)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush()


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5):
            return True
    except OSError:  # not answering yet, or 503 (urllib's HTTPError is an OSError)
        return False


def time_to_ready(daemon: Daemon) -> dict[str, float]:
    """From the daemon's first assignment (its log) to /readyz 200, and from its start."""
    started = time.time()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready(daemon.port):
        daemon._check_running()
        if time.monotonic() > deadline:
            raise SystemExit(f"not ready in {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.01)
    at = time.time()
    stamps = ASSIGNED.findall(daemon.log.read_text())
    if not stamps:
        raise SystemExit("ready without an 'assigned partitions' line in the log (log.level must be INFO)")
    assigned = datetime.strptime(stamps[0], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return {"assigned_to_ready_s": round(at - assigned, 3), "start_to_ready_s": round(at - started, 3)}


def restore_figures(port: int) -> dict[str, float]:
    text = scrape(port)
    out = {}
    for source in ("local", "changelog"):
        out[f"keys_from_{source}"] = metric(text, f'streamlstm_restored_keys_total{{source="{source}"}}')
        out[f"replayed_{source}"] = metric(text, f'streamlstm_restore_replayed_records_total{{source="{source}"}}')
    return out


def checkpoint_figures(port: int) -> dict[str, float]:
    text = scrape(port)
    records = metric(text, "streamlstm_checkpoint_keys_sum")
    return {"checkpoints": metric(text, "streamlstm_checkpoints_total"), "state_records": records,
            "checkpoint_us_per_record": round(metric(text, "streamlstm_checkpoint_duration_seconds_sum")
                                              / max(records, 1) * 1e6, 2)}


def drain(tmp: Path, bootstrap: str, topics: dict[str, str], name: str, model: Path, overrides: list[str],
          events: int) -> tuple[Daemon, dict[str, float]]:
    """A daemon of group `name` drains the topic's backlog; its events/s and checkpoint figures."""
    daemon = Daemon(tmp, bootstrap, topics, name, model, overrides, None)
    try:
        daemon.wait_ready()
        outputs = Outputs(bootstrap, topics["serve"])
        figures = events_per_second(outputs.read(events))
        outputs.close()
        return daemon, figures | checkpoint_figures(daemon.port)
    except BaseException:
        daemon.stop()
        raise


def run_client(client: str, args: argparse.Namespace, model: Path, tmp: Path) -> dict[str, object]:
    overrides = [f"kafka.client={client}", "model.device=cpu", "log.level=INFO", *args.set]
    report: dict[str, object] = {"client": client}
    with EmbeddedBroker(log_file=tmp / f"tansu-{client}.log") as broker:
        bootstrap = broker.bootstrap
        for name, keys in (("few", args.few_keys), ("many", args.keys)):
            topics = {"input": f"events-{name}", "serve": f"predictions-{name}", "dlq": f"dlq-{name}"}
            ensure_topics(KafkaConfig(bootstrap_servers=bootstrap, input_topic=topics["input"],
                                      output_topic=topics["serve"], dlq_topic=topics["dlq"],
                                      topic_partitions=args.partitions))
            produce(bootstrap, topics["input"], key_order(args.events, keys, seed=len(name)), seed=len(name))
            daemon, figures = drain(tmp, bootstrap, topics, f"{client}-{name}", model, overrides, args.events)
            report[f"{name}_keys"] = {"keys": keys} | figures
            print(f"{client}: {keys} keys: {figures['events_per_s']:.0f} events/s, "
                  f"{figures['checkpoint_us_per_record']} µs of checkpoint per state record", flush=True)
            if name == "few":
                daemon.stop()
        report["many_over_few"] = round(report["many_keys"]["events_per_s"] / report["few_keys"]["events_per_s"], 3)

        daemon.stop()  # the many-keys daemon: its final checkpoint fills its local stores
        for label, extra in (("restart_same_state_dir", []),
                             ("new_owner", [f"state.dir={tmp / f'{client}-new-owner-state'}"])):
            daemon = Daemon(tmp, bootstrap, topics, f"{client}-many", model, overrides + extra, None)
            try:
                figures = time_to_ready(daemon) | restore_figures(daemon.port)
            finally:
                daemon.stop()
            keys = figures["keys_from_local"] + figures["keys_from_changelog"]
            figures["keys_per_s"] = round(keys / figures["assigned_to_ready_s"])
            report[label] = figures
            print(f"{client}: {label}: ready {figures['assigned_to_ready_s']:.2f} s after its assignment "
                  f"({keys:.0f} keys: {figures['keys_from_local']:.0f} from the local stores, "
                  f"{figures['keys_from_changelog']:.0f} from the changelog; {figures['keys_per_s']} keys/s)",
                  flush=True)
    return report


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--few-keys", type=int, default=10_000)
    p.add_argument("--events", type=int, default=2_000_000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--client", action="append", choices=CLIENTS, help="repeatable (default: both)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a config override for every daemon, repeatable")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    args = p.parse_args()
    args.client = args.client or list(CLIENTS)
    return args


def main() -> None:
    args = parse_args()
    report = {"benchmark": "scale", "command": "python " + shlex.join(sys.argv),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "broker": BROKER, "parameters": {k: v for k, v in vars(args).items() if k != "out"}}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model = make_model(tmp / "model", args.hidden, args.layers)
        report["clients"] = {client: run_client(client, args, model, tmp) for client in args.client}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
