"""Monitoring: the alerting rules (promtool), and a real Prometheus scraping a real daemon after traffic:
the exposition passes promtool's lint, PromQL sees the traffic that was sent, the rules evaluate, and
every dashboard query names exported metrics and answers.

Needs Debian's prometheus package: deploy/install-test-tools.sh (part of the README's test command).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from streamlstm.demo.broker import free_port
from tests.conftest import (
    DaemonProcess,
    daemon_metric,
    event_value,
    http_get,
    produce,
    wait_until,
)

MONITORING = Path(__file__).parent.parent / "deploy" / "monitoring"
RULES = MONITORING / "alerts.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
# Events sent: accepted, and malformed (dead-lettered). BAD is 3 % of all: StreamlstmRejectionRatioHigh
# (5 %) must stay quiet however rate() extrapolates the short series (at 9 % it depended on scrape timing).
GOOD, BAD = 600, 20
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
                "bool", "inf", "nan"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run deploy/install-test-tools.sh (Debian's prometheus package)")
    return path


def run_tool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([tool(args[0]), *args[1:]], input=stdin, capture_output=True, text=True, timeout=60)


def test_the_rules_are_valid():
    result = run_tool("promtool", "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_alert_has_a_unit_test_and_the_unit_tests_pass():
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    tested = {t["alertname"] for case in yaml.safe_load((MONITORING / "alerts.test.yaml").read_text())["tests"]
              for t in case["alert_rule_test"]}
    assert alerts == tested
    result = run_tool("promtool", "test", "rules", str(MONITORING / "alerts.test.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


@dataclass
class Scraped:
    """A daemon after known traffic, and a Prometheus server that has scraped all of it."""

    daemon: DaemonProcess
    prometheus_port: int
    at: float  # the time of Prometheus's last sample of the finished traffic
    exposition: str

    def query(self, promql: str) -> list[dict]:
        args = urllib.parse.urlencode({"query": promql, "time": f"{self.at:.3f}"})
        status, body = http_get(self.prometheus_port, f"/api/v1/query?{args}")
        assert status == 200, f"{promql}: {body}"
        return json.loads(body)["data"]["result"]

    def scalar(self, promql: str) -> float:
        result = self.query(promql)
        assert len(result) == 1, f"{promql}: {result}"
        return float(result[0]["value"][1])


def start_prometheus(tmp: Path, target_port: int) -> tuple[subprocess.Popen, int]:
    """Scrapes and evaluates every second, so the test waits on data, not on intervals."""
    port = free_port()
    shutil.copy(RULES, tmp / "alerts.yaml")
    (tmp / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yaml"],
        "scrape_configs": [{"job_name": "streamlstm", "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
    }))
    proc = subprocess.Popen([tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--log.level=warn"], stdout=open(tmp / "prometheus.log", "wb"), stderr=subprocess.STDOUT)
    return proc, port


def last_sample_time(port: int, series: str, value: float) -> float | None:
    """The time of the newest sample of a series, once it holds `value`."""
    args = urllib.parse.urlencode({"query": f"timestamp({series}) and {series} == {value}"})
    status, body = http_get(port, f"/api/v1/query?{args}")
    result = json.loads(body)["data"]["result"] if status == 200 else []
    return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="module")
def scraped(tmp_path_factory, broker, model_dir) -> Iterator[Scraped]:
    tmp = tmp_path_factory.mktemp("monitoring")
    daemon = DaemonProcess(tmp, broker, model_dir).start()
    prometheus, port = start_prometheus(tmp, daemon.port)
    try:
        up = 'up{job="streamlstm"}'
        wait_until(lambda: last_sample_time(port, up, 1) is not None, 60, "Prometheus scraping the daemon",
                   lambda: (tmp / "prometheus.log").read_text())
        good = [(f"key-{i % 50}".encode(), event_value([float(i % 7), 20.0, float(i % 24)])) for i in range(GOOD)]
        produce(broker, daemon.topic, good + [(b"bad", b"not json")] * BAD)
        daemon.wait_for(lambda: daemon_metric(daemon, "streamlstm_predictions_produced_total") == GOOD, 60,
                        "every prediction sent")
        daemon.wait_for(lambda: daemon_metric(daemon, "streamlstm_checkpoints_total") > 0, 30, "a checkpoint")
        exposition = http_get(daemon.port, "/metrics")[1]
        done = 'streamlstm_predictions_produced_total{job="streamlstm"}'  # one series: timestamp() is its sample's
        wait_until(lambda: last_sample_time(port, done, GOOD) is not None, 30, "Prometheus scraping the end")
        yield Scraped(daemon, port, last_sample_time(port, done, GOOD), exposition)
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        daemon.kill()


def test_promtool_lints_the_real_exposition_after_traffic(scraped):
    assert f'streamlstm_events_rejected_total{{reason="not_json"}} {BAD}.0' in scraped.exposition
    result = run_tool("promtool", "check", "metrics", stdin=scraped.exposition)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_events_rate_matches_the_traffic(scraped):
    window = 300  # longer than the whole test: the rate times the window is every event
    consumed = scraped.scalar(f'sum(rate(streamlstm_events_consumed_total{{job="streamlstm"}}[{window}s]))')
    assert consumed * window == pytest.approx(GOOD + BAD, rel=0.01)
    # Every reason's series exists at 0 from the start, so rate() sees the first rejections too.
    rejected = scraped.scalar(f'sum(rate(streamlstm_events_rejected_total{{job="streamlstm"}}[{window}s]))')
    assert rejected * window == pytest.approx(BAD, rel=0.01)


def histogram_quantile(q: float, exposition: str, name: str) -> float:
    """Prometheus's own estimate (linear within the bucket) from the daemon's cumulative bucket counts."""
    buckets = [(float(le), float(count)) for le, count in
               re.findall(rf'^{name}_bucket\{{le="([^"]+)"\}} (\S+)$', exposition, re.MULTILINE)]
    rank = q * buckets[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            return lower_le + (le - lower_le) * (rank - lower_count) / (count - lower_count)
        lower_le, lower_count = le, count
    raise AssertionError("no bucket holds the rank")


def test_the_p99_latency_matches_the_daemons_histogram(scraped):
    p99 = scraped.scalar('histogram_quantile(0.99, sum by (le) '
                         '(rate(streamlstm_prediction_latency_seconds_bucket{job="streamlstm"}[300s])))')
    assert 0 < p99 < 10
    assert p99 == pytest.approx(histogram_quantile(0.99, scraped.exposition, "streamlstm_prediction_latency_seconds"),
                                rel=0.01)
    assert scraped.scalar('sum(increase(streamlstm_prediction_latency_seconds_count{job="streamlstm"}[300s]))') \
        == pytest.approx(GOOD, rel=0.01)


def test_the_alerting_rules_evaluate_on_live_data_and_stay_quiet(scraped):
    def rules() -> list[dict]:
        body = json.loads(http_get(scraped.prometheus_port, "/api/v1/rules")[1])
        return [r for g in body["data"]["groups"] for r in g["rules"]]

    wait_until(lambda: all(r["health"] == "ok" for r in rules()), 30, "every rule evaluated",
               lambda: json.dumps([r for r in rules() if r["health"] != "ok"], indent=1))
    active = {r["name"]: r["state"] for r in rules() if r.get("state", "inactive") != "inactive"}  # a record has none
    # The test's model has random weights: worse than repeating the last value, so that alert may be
    # pending once Prometheus has two scrapes of its errors; its 30 minutes never pass here (when it
    # fires is deploy/monitoring/alerts.test.yaml's)
    if active.get("StreamlstmModelWorseThanNaive") == "pending":
        del active["StreamlstmModelWorseThanNaive"]
    assert {r["name"] for r in rules()} and not active, active


def metric_names(promql: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers outside label matchers, ranges, strings
    and groupings that are neither functions nor keywords."""
    bare = re.sub(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]|\b(by|without|on|ignoring)\s*\([^)]*\)', " ", promql)
    names = re.findall(r"(?<![\w$.])([a-zA-Z_:][\w:]*)\b(?!\s*\()", bare)
    return {n for n in names if n.lower() not in PROMQL_WORDS}


def exported(exposition: str) -> set[str]:
    """Every sample name the daemon exports, including families with no sample yet (no label values)."""
    names = set(re.findall(r"^([a-zA-Z_:][\w:]*)[{ ]", exposition, re.MULTILINE))
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.MULTILINE):
        if kind == "histogram":
            names |= {name + s for s in HISTOGRAM_SUFFIXES}
        else:  # a counter family's TYPE line drops the _total its samples have
            names |= {name, name + "_total"} if kind == "counter" else {name}
    return names


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    queries = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]  # a row has none
    return queries + [(v["name"], v["definition"]) for v in dash["templating"]["list"] if "definition" in v]


def test_the_metric_name_reader_finds_what_a_query_reads():
    assert metric_names('histogram_quantile(0.99, sum by (le) (rate(a_bucket{job="x", b=~"$c"}[$__rate_interval])))'
                        ' / sum without (d) (b_total) and on (e) label_values(c_info, ns)') == \
        {"a_bucket", "b_total", "c_info", "ns"}


def test_every_dashboard_query_reads_only_exported_metrics_and_answers(scraped):
    assert len(json.loads(DASHBOARD.read_text())["panels"]) >= 10
    exports = exported(scraped.exposition)
    for title, expr in dashboard_queries():
        if expr.startswith("label_values("):  # a Grafana function: its first argument is the query
            expr = expr[len("label_values("):].rsplit(",", 1)[0]
        unknown = metric_names(expr) - exports
        assert not unknown, f"{title!r} reads {unknown}, which the daemon does not export"
    answered = {}
    for title, expr in dashboard_queries()[:-1]:  # the panels; the variable's query was checked above
        promql = expr.replace("$namespace", ".*").replace("$__rate_interval", "300s")
        answered[title] = answered.get(title, False) or bool(scraped.query(promql))
    assert all(answered.values()), [t for t, ok in answered.items() if not ok]
