"""The benchmarks still run: each script, at a tiny size, writes its report with the command, the
machine and figures that make sense. Speed is measured by running them in full (docs/benchmarks.md);
this only keeps them from rotting between those runs."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def run_benchmark(script: str, out: Path, *args: str) -> dict:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=BENCHMARKS.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert script in report["command"] and report["machine"]["cores"] >= 1 and report["machine"]["torch"]
    return report


def test_end_to_end_reports_relays_serve_latency_and_the_control(tmp_path):
    report = run_benchmark("e2e_bench.py", tmp_path / "e2e.json", "--events", "1000", "--keys", "200",
                           "--repeat", "1", "--latency-seconds", "1")
    assert len(report["rounds"]) == 1
    for figures in report["rounds"]:  # every output record counted exactly, or the run fails
        assert {figures[name]["events"] for name in ("relay", "relay-confluent", "serve")} == {1000}
        assert figures["ratio_to_relay"] > 0
        # CPU per event: a relay's and serve's own, each some microseconds (not start-up, not zero)
        assert all(0.5 < figures[name]["cpu_us_per_event"] < 1000 for name in ("relay", "relay-confluent", "serve"))
    assert report["median"]["serve_events_per_s"] > 0 and report["median"]["cpu_ratio_to_relay"] > 0
    for phase in ("low_rate", "half_rate", "full_rate", "daemon"):
        assert phase in report
    assert report["control"]["relay"] == "relay"
    assert report["control"]["half_rate"]["rate_per_s"] == report["half_rate"]["rate_per_s"]
    assert 0 < report["control"]["low_rate"]["sent_p50_ms"] <= report["control"]["low_rate"]["sent_p99_ms"]


def test_step_kernel_reports_the_loop_and_the_batched_step(tmp_path):
    report = run_benchmark("step_bench.py", tmp_path / "step.json", "--hidden", "16", "--layers", "1",
                           "--batch", "1", "64", "--per-event", "200", "--budget", "0.2")
    rows = {row["batch"]: row for row in report["results"]}
    assert set(rows) == {1, 64} and all(row["per_event"] > 0 and row["advance"] > 0 for row in rows.values())
    assert rows[64]["advance"] > rows[1]["advance"]  # batching pays even at this size


def test_state_reports_memory_checkpoint_cost_and_a_verified_restore(tmp_path):
    report = run_benchmark("state_bench.py", tmp_path / "state.json", "--keys", "2000")
    assert report["memory"]["keys"] == 2000 and report["memory"]["row_bytes"] > 0
    assert set(report["checkpoints"]) == {"kafka-python", "confluent"}
    assert all(c["keys"] == 2000 and c["us_per_key"] > 0 for c in report["checkpoints"].values())
    assert report["restore"]["keys"] == 2000 and report["restore"]["keys_per_s"] > 0


def test_scale_reports_throughput_by_key_count_and_both_restores(tmp_path):
    report = run_benchmark("scale_bench.py", tmp_path / "scale.json", "--client", "confluent", "--keys", "2000",
                           "--few-keys", "200", "--events", "4000", "--hidden", "8")
    figures = report["clients"]["confluent"]
    assert figures["few_keys"]["events"] == figures["many_keys"]["events"] == 4000 and figures["many_over_few"] > 0
    assert figures["restart_same_state_dir"]["keys_from_local"] == 2000  # every key, nothing from the changelog
    assert figures["restart_same_state_dir"]["keys_from_changelog"] == 0
    assert figures["new_owner"]["keys_from_changelog"] == 2000 and figures["new_owner"]["assigned_to_ready_s"] > 0


def test_the_soak_verdict_fails_on_growth_after_the_warm_up():
    sys.path.insert(0, str(BENCHMARKS))
    from soak import verdict

    def samples(rss=lambda t: 300.0, threads=lambda t: 9, live=lambda t: 5000) -> list[dict]:
        return [{"t_s": t, "rss_mb": rss(t), "threads": threads(t), "open_files": 33, "live_keys": live(t),
                 "expected_live_keys": 5000} for t in range(0, 1800, 10)]

    assert verdict(samples(rss=lambda t: 200 + t if t < 600 else 800 + (t % 20)), 600)["passed"]  # warm-up aside
    assert not verdict(samples(rss=lambda t: 300 + t / 30), 600)["passed"]  # +40 MB in 20 min: a leak
    assert not verdict(samples(threads=lambda t: 9 + t // 300), 600)["passed"]
    assert not verdict(samples(live=lambda t: 5000 + t * 2), 600)["passed"]  # keys that never expire
    assert not verdict(samples(), 1800)["passed"]  # nothing after the warm-up: no verdict


def test_resident_reports_rate_fetches_and_memory_against_the_bound(tmp_path):
    report = run_benchmark("resident_bench.py", tmp_path / "resident.json", "--keys", "4000", "--resident", "500",
                           "--hidden", "8", "--poll", "200", "--checkpoint-events", "1000", "--measure-events", "3000",
                           "--dir", str(tmp_path))
    load, zipf, uniform = (report["phases"][name] for name in ("load", "zipf", "uniform"))
    assert load["new"] == 4000 and load["fetched"] == 0  # every key once: nothing to fetch yet
    assert uniform["fetched"] > 2000 and uniform["new"] == 0 and uniform["admit_us_per_missed_key"] > 0
    assert all(p["resident"] <= 500 and p["events_per_s"] > 0 for p in (load, zipf, uniform))
    assert report["resident_state_bytes"] == 500 * 2 * 2 * 8 * 4 and report["rss_before_keys_bytes"] > 0
    assert report["phases"]["restore"]["keys"] == 500  # a fresh process restored the stores within the bound
    assert set(report["rss_per_resident_key_by_phase"]) == {"load", "zipf", "uniform", "restore"}


def test_the_event_path_reports_cpu_per_event_for_each_state_dtype_and_with_a_shadow():
    for dtype, extra, named in (("float32", [], " float32: "), ("bfloat16", ["--live-accuracy", "--shadow"],
                                                               " bfloat16 live_accuracy shadow: ")):
        result = subprocess.run([sys.executable, str(BENCHMARKS / "event_path_bench.py"), "--keys", "3000", "--polls",
                                 "3", "--dtype", dtype, *extra], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        figure = float(result.stdout.split(": ")[-1].split()[0])
        assert named in result.stdout and 0.1 < figure < 10_000
