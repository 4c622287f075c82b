"""A dead letter is the bad event itself, whole, so it can be fixed and sent again; cut only when the
producer could never write it, and then saying so."""

import pytest

from streamlstm.transport.api import Record
from streamlstm.transport.clients import (
    DLQ_DETAIL,
    DLQ_REASON,
    DLQ_SOURCE,
    DLQ_TRUNCATED,
    PRODUCER_SETTINGS,
    RECORD_OVERHEAD,
    dead_letter,
)

LIMIT = PRODUCER_SETTINGS["max_request_size"]


def record(key: bytes | None, value: bytes | None, headers=()) -> Record:
    return Record("events", 2, 41, 1_700_000_000_000, key, value, list(headers))


def size(key, value, headers) -> int:
    """What the producer counts, bounded above: key, value, each header with two varint lengths, and the
    record and batch framing."""
    return len(key or b"") + len(value or b"") + sum(len(n) + len(v) + 10 for n, v in headers) + RECORD_OVERHEAD


@pytest.mark.parametrize("value_bytes", [0, 400_000, LIMIT - 2_000])
def test_anything_that_fits_one_record_is_kept_whole(value_bytes):
    original = record(b"meter-7", b"x" * value_bytes, [("traceparent", b"00-ab-cd-01"), ("empty", None)])
    key, value, headers = dead_letter(original, "value_too_large", "value of many bytes", LIMIT)
    assert (key, value) == (original.key, original.value)
    assert headers == [("traceparent", b"00-ab-cd-01"), ("empty", b""), (DLQ_REASON, b"value_too_large"),
                       (DLQ_DETAIL, b"value of many bytes"), (DLQ_SOURCE, b"events/2/41")]


def test_an_earlier_pass_through_the_dead_letter_topic_leaves_no_stale_headers_of_ours():
    original = record(b"k", b"{", [(DLQ_REASON, b"bad_ts"), (DLQ_TRUNCATED, b"9")])
    _, _, headers = dead_letter(original, "not_json", "value is not JSON", LIMIT)
    assert [name for name, _ in headers] == [DLQ_REASON, DLQ_DETAIL, DLQ_SOURCE]


def test_a_value_no_record_could_hold_is_cut_to_fit_and_says_how_long_it_was():
    original = record(b"meter-7", b"v" * 1_500_000, [("traceparent", b"00-ab-cd-01")])
    key, value, headers = dead_letter(original, "value_too_large", "value of 1500000 bytes", LIMIT)
    named = dict(headers)
    assert key == b"meter-7" and named["traceparent"] == b"00-ab-cd-01"
    assert original.value.startswith(value) and LIMIT - 1_000 < size(key, value, headers) <= LIMIT
    assert named[DLQ_TRUNCATED] == b"1500000"
    assert named[DLQ_DETAIL] == (b"value of 1500000 bytes; cut to fit one record of 1048576 bytes: "
                                 b"value of 1500000 bytes")


def test_a_key_no_record_could_hold_drops_the_original_headers_and_is_cut_too():
    original = record(b"k" * 2_000_000, b"{}", [("traceparent", b"00-ab-cd-01")])
    key, value, headers = dead_letter(original, "key_too_large", "key of 2000000 bytes", LIMIT)
    named = dict(headers)
    assert original.key.startswith(key) and value == b"" and size(key, value, headers) <= LIMIT
    assert "traceparent" not in named and named[DLQ_TRUNCATED] == b"2"
    assert b"1 original headers dropped, key of 2000000 bytes" in named[DLQ_DETAIL]
