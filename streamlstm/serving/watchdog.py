"""The progress watchdog: a consumer that stops getting records while its partitions have records to
give must not look healthy.

A poll loop that polls is not one that progresses: a broker can keep answering fetches with nothing
while the log grows (seen on Tansu's S3 engine, with a bare consumer too), a partition leader can stop
answering, an assignment can be lost without notice. The lag the client last heard of says there is
work; no record for `timeout_s` while there is says the consumer is stuck. Then: one warning, a count,
one attempt to recover (the caller's), and if another `timeout_s` passes without a record, liveness
fails so that Kubernetes restarts the pod.

What it cannot see: lag the client has not heard of. A fetch path that hangs while the daemon was caught
up leaves the last lag at zero; the consumer group's lag measured from outside the daemon (the broker's
committed offsets against its log ends) is the alert for that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from ..transport.api import TopicPartition


class Verdict(Enum):
    PROGRESSING = "progressing"
    STALLED = "stalled"  # for one timeout: recover now
    FAILED = "failed"  # recovery did not help: fail liveness


@dataclass
class ProgressWatchdog:
    timeout_s: float  # 0: off
    since: float | None = None  # when lag was first seen with no record consumed since; None: none now
    recovered_at: float = 0.0  # when recovery was tried, in this stall
    verdict: Verdict = Verdict.PROGRESSING
    lagging: dict[TopicPartition, int] = field(default_factory=dict)  # as last checked

    def consumed(self) -> None:
        """Records arrived: whatever was stuck is not any more."""
        self.since = None
        self.verdict = Verdict.PROGRESSING

    def check(self, now: float, lag: dict[TopicPartition, int | None]) -> Verdict | None:
        """`lag` of the partitions records are expected from (assigned, not paused); None where the client
        does not know it now (librdkafka, after a seek), which leaves the last known. Returns STALLED (try
        to recover) or FAILED (that did not help) once each, when the verdict becomes that; else None."""
        known = {tp: self.lagging.get(tp) if n is None else n for tp, n in lag.items()}
        self.lagging = {tp: n for tp, n in known.items() if n}
        if not self.lagging or not self.timeout_s:
            self.consumed()
            return None
        if self.since is None:
            self.since = now
        if self.verdict is Verdict.PROGRESSING and now - self.since >= self.timeout_s:
            self.verdict, self.recovered_at = Verdict.STALLED, now
            return self.verdict
        if self.verdict is Verdict.STALLED and now - self.recovered_at >= self.timeout_s:
            self.verdict = Verdict.FAILED
            return self.verdict
        return None

    def stalled_for(self, now: float) -> float:
        return 0.0 if self.since is None else now - self.since
