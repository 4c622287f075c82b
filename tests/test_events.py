"""The event decoder: every malformed event gets its reason code; nothing raises."""

import json

import pytest

from streamlstm.events import REASONS, Event, EventDecoder, Rejection

decoder = EventDecoder(["a", "b"])


def test_list_and_named_features_decode_in_model_order():
    assert decoder.decode(b"k", b'{"features": [1, 2.5], "ts": 17}') == Event("k", [1.0, 2.5], 17)
    assert decoder.decode("ключ".encode(), b'{"features": {"b": 2, "a": 1}}') == Event("ключ", [1.0, 2.0], None)


def test_control_fields_may_come_with_or_without_features():
    assert decoder.decode(b"k", b'{"features": [1, 2], "reset": true}') == Event("k", [1.0, 2.0], None, reset=True)
    assert decoder.decode(b"k", b'{"end": true, "ts": 3}') == Event("k", None, 3, end=True)
    assert decoder.decode(b"k", b'{"reset": true}') == Event("k", None, None, reset=True)


def test_a_label_is_carried_by_the_event_and_changes_nothing_else():
    decoder = EventDecoder(["a", "b"])
    for value, label in ((b'{"features": [1, 2], "label": "high"}', "high"), (b'{"features": [1, 2], "label": 3}', 3),
                         (b'{"features": {"a": 1, "b": 2}, "label": "x"}', "x")):
        assert decoder.decode(b"k", value) == Event("k", [1.0, 2.0], None, label=label)


@pytest.mark.parametrize("key,value,reason", [
    (None, b'{"features": [1, 2]}', "bad_key"),
    (b"", b'{"features": [1, 2]}', "bad_key"),
    (b"\xff", b'{"features": [1, 2]}', "not_utf8"),
    (b"k", b"\xff\xfe", "not_utf8"),
    (b"k", b"{nope", "not_json"),
    (b"k", None, "not_json"),
    (b"k", b"[1, 2]", "not_object"),
    (b"k", b'{"features": [1, 2], "colour": 1}', "unknown_field"),
    (b"k", b'{"ts": 5}', "missing_features"),
    (b"k", b'{"ts": 5, "reset": false}', "missing_features"),
    (b"k", b'{"features": [1, 2], "end": 1}', "bad_control"),
    (b"k", b'{"reset": "yes"}', "bad_control"),
    (b"k", b'{"features": "1,2"}', "missing_features"),
    (b"k", b'{"features": [1]}', "wrong_feature_count"),
    (b"k", b'{"features": {"a": 1, "b": 2, "c": 3}}', "unknown_feature"),
    (b"k", b'{"features": {"a": 1}}', "missing_feature"),
    (b"k", b'{"features": [1, "2"]}', "non_numeric_feature"),
    (b"k", b'{"features": [true, 2]}', "non_numeric_feature"),
    (b"k", b'{"features": [1, NaN]}', "non_finite_feature"),
    (b"k", b'{"features": [1, Infinity]}', "non_finite_feature"),
    (b"k", b'{"features": [1, 2], "ts": "yesterday"}', "bad_ts"),
    (b"k", b'{"features": [1, 2], "label": true}', "bad_label"),
    (b"k", b'{"features": [1, 2], "label": 1.5}', "bad_label"),
    (b"k", b'{"features": [1, 2], "label": ["a"]}', "bad_label"),
])
def test_each_malformed_event_gets_its_reason(key, value, reason):
    decoded = decoder.decode(key, value)
    assert isinstance(decoded, Rejection) and decoded.reason == reason and decoded.reason in REASONS
    assert decoded.detail


def test_a_null_value_is_named_a_tombstone_with_what_to_send_instead():
    rejection = decoder.decode(b"k", None)
    assert rejection.reason == "not_json" and "tombstone" in rejection.detail and '{"end": true}' in rejection.detail


def test_detail_is_readable_and_json_safe():
    rejection = decoder.decode(b"k", b'{"features": [1]}')
    assert "2" in rejection.detail and json.dumps(rejection.detail)


def test_numbers_too_large_for_a_float_are_rejected_not_raised():
    huge = "9" * 400
    assert decoder.decode(b"k", f'{{"features": [1, {huge}]}}'.encode()).reason == "non_finite_feature"
    assert decoder.decode(b"k", f'{{"features": [1, 2], "ts": {huge}}}'.encode()).reason == "bad_ts"


@pytest.mark.parametrize("body", ['{"features": [1e39, 2]}', '{"features": [1, -1e300]}',
                                  '{"features": {"a": 1e39, "b": 2}}', '{"features": [1, %d]}' % 10**39])
def test_features_beyond_float32_are_not_finite_to_the_model(body):
    """The model computes in float32: a larger value would enter the step as an infinity."""
    rejection = decoder.decode(b"k", body.encode())
    assert rejection.reason == "non_finite_feature" and "float32" in rejection.detail
    assert EventDecoder(["a", "b"], replacements=[5.0, 6.0]).decode(b"k", body.encode()).replaced == 1


def test_features_at_float32s_limits_are_accepted():
    biggest = 3.4028234663852886e38
    assert decoder.decode(b"k", b'{"features": [%r, %r]}' % (biggest, -biggest)).features == [biggest, -biggest]


@pytest.mark.parametrize("features", ['[1, 2.5e30]', '[-7.1e29, 2]', '{"a": 1, "b": 2.5e30}'])
def test_features_beyond_the_models_limits_are_rejected_by_name_or_replaced(features):
    """Limits per feature, inclusive, on the fast path (a list) and the full checks (by name) alike."""
    limited = EventDecoder(["a", "b"], limits=[(-7e29, 7e29), (-2e30, 2e30)])
    assert limited.decode(b"k", b'{"features": [-7e29, 2e30]}').features == [-7e29, 2e30]
    assert limited.decode(b"k", b'{"features": {"a": 7e29, "b": -2e30}}').features == [7e29, -2e30]
    value = b'{"features": %s}' % features.encode()
    rejection = limited.decode(b"k", value)
    assert rejection.reason == "non_finite_feature" and "overflow" in rejection.detail
    assert "'a'" in rejection.detail or "'b'" in rejection.detail
    replacing = EventDecoder(["a", "b"], replacements=[5.0, 6.0], limits=[(-7e29, 7e29), (-2e30, 2e30)])
    assert replacing.decode(b"k", value).replaced == 1


@pytest.mark.parametrize("ts", [2**63, -(2**63) - 1, 1e300, -1e300])
def test_timestamps_beyond_kafkas_64_bit_range_are_rejected(ts):
    """A Kafka timestamp is a signed 64-bit count of milliseconds; a later one would overflow the
    state table's event times (ttl_clock: event_time) and stop the daemon."""
    for body in (f'{{"features": [1, 2], "ts": {ts}}}', f'{{"features": {{"a": 1, "b": 2}}, "ts": {ts}}}'):
        rejection = decoder.decode(b"k", body.encode())
        assert rejection.reason == "bad_ts" and "64-bit" in rejection.detail


def test_timestamps_at_the_ends_of_the_range_are_kept_exactly():
    for ts in (2**63 - 1, -(2**63), 1_700_000_000_123):
        assert decoder.decode(b"k", f'{{"features": [1, 2], "ts": {ts}}}'.encode()).ts == ts


@pytest.mark.parametrize("value", [b"[" * 3000, b'{"features":' * 3000 + b"1" + b"}" * 3000,
                                   b'{"features": [1, 2], "ts": ' + b"[" * 3000 + b"]" * 3000 + b"}"])
def test_json_nested_too_deep_to_parse_is_rejected_not_raised(value):
    rejection = decoder.decode(b"k", value)
    assert rejection.reason == "not_json" and "nested too deeply" in rejection.detail


def test_oversized_keys_and_values_are_rejected_before_parsing():
    small = EventDecoder(["a", "b"], max_key_bytes=4, max_value_bytes=30)
    assert small.decode(b"12345", b'{"features": [1, 2]}').reason == "key_too_large"
    assert small.decode(b"k", b'{"features": [1, 2], "ts": 1700000000000}').reason == "value_too_large"
    assert small.decode(b"1234", b'{"features": [1, 2]}') == Event("1234", [1.0, 2.0], None)


@pytest.mark.parametrize("value", [b'{"features": [1, NaN]}', b'{"features": [1, Infinity]}',
                                   b'{"features": [1, null]}', b'{"features": {"a": 1, "b": "warm"}}'])
def test_the_replace_policy_puts_the_training_mean_in_place_of_an_invalid_value(value):
    replacing = EventDecoder(["a", "b"], replacements=[10.0, 20.0])
    assert replacing.decode(b"k", value) == Event("k", [1.0, 20.0], None, replaced=1)
    assert decoder.decode(b"k", value).reason in ("non_finite_feature", "non_numeric_feature")
