"""The progress watchdog: partitions with lag and no record for a timeout are a stalled consumer, tried
once to recover, then failed; lag alone, or no lag at all, is not a stall."""

from streamlstm.serving.watchdog import ProgressWatchdog, Verdict
from streamlstm.transport.api import TopicPartition

P0, P1 = TopicPartition("events", 0), TopicPartition("events", 1)


def test_lag_without_records_stalls_after_the_timeout_then_fails_after_as_long_again():
    dog = ProgressWatchdog(timeout_s=10)
    assert dog.check(0, {P0: 5, P1: 0}) is None
    assert dog.check(9.9, {P0: 5, P1: 0}) is None and dog.verdict is Verdict.PROGRESSING
    assert dog.check(10, {P0: 7, P1: 0}) is Verdict.STALLED and dog.lagging == {P0: 7}
    assert dog.check(15, {P0: 9}) is None, "reported once"
    assert dog.check(20, {P0: 9}) is Verdict.FAILED and dog.stalled_for(20) == 20
    assert dog.check(40, {P0: 9}) is None and dog.verdict is Verdict.FAILED


def test_a_record_ends_a_stall_even_a_failed_one():
    dog = ProgressWatchdog(timeout_s=10)
    dog.check(0, {P0: 5})
    dog.check(10, {P0: 5})
    dog.check(20, {P0: 5})
    dog.consumed()
    assert dog.verdict is Verdict.PROGRESSING and dog.check(25, {P0: 5}) is None
    assert dog.check(34.9, {P0: 5}) is None, "the timeout counts from the first lag seen after the record"
    assert dog.check(35, {P0: 5}) is Verdict.STALLED


def test_an_idle_topic_never_stalls_and_lag_seen_late_counts_from_then():
    dog = ProgressWatchdog(timeout_s=10)
    for now in range(0, 100, 5):
        assert dog.check(now, {P0: 0, P1: 0}) is None
    assert dog.check(100, {P0: 3}) is None, "an hour idle is not an hour stalled"
    assert dog.check(110, {P0: 3}) is Verdict.STALLED


def test_lag_the_client_does_not_know_for_a_while_is_the_last_known():
    dog = ProgressWatchdog(timeout_s=10)
    dog.check(0, {P0: 5, P1: 0})
    assert dog.check(10, {P0: None, P1: None}) is Verdict.STALLED and dog.lagging == {P0: 5}
    assert dog.check(20, {P0: None, P1: 0}) is Verdict.FAILED
    assert dog.check(21, {P1: 0}) is None and dog.verdict is Verdict.PROGRESSING, "P0 no longer expected"


def test_lag_that_goes_away_resets_the_clock_and_zero_turns_it_off():
    dog = ProgressWatchdog(timeout_s=10)
    dog.check(0, {P0: 5})
    dog.check(8, {})
    assert dog.check(12, {P0: 5}) is None and dog.check(21.9, {P0: 5}) is None
    off = ProgressWatchdog(timeout_s=0)
    assert all(off.check(now, {P0: 5}) is None for now in (0, 1000, 10**6))
