"""Property: the decoder decodes every valid event exactly, names the reason of every invalid one, and
never raises, whatever bytes arrive (10 000+ generated cases)."""

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamlstm.events import FLOAT32_MAX, REASONS, Event, EventDecoder, Rejection

NAMES = ("load", "temp", "hour")
decoder = EventDecoder(NAMES)
SETTINGS = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Numbers the model can take: finite in float32, which it computes in.
finite = st.floats(min_value=-FLOAT32_MAX, max_value=FLOAT32_MAX) | st.integers(-(2**53), 2**53)
json_values = st.recursive(
    st.none() | st.booleans() | finite | st.sampled_from([math.nan, math.inf, 10**400]) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["features", "ts", "load", "temp", "hour", "reset", "end", "x"]), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def valid_events(draw):
    values = draw(st.lists(finite, min_size=3, max_size=3))
    features = dict(zip(NAMES, values)) if draw(st.booleans()) else values
    body = {"features": features}
    if draw(st.booleans()):
        body["ts"] = draw(st.integers(0, 2**62))
    for control in ("reset", "end"):
        if draw(st.booleans()):
            body[control] = draw(st.booleans())
    return draw(st.text(min_size=1, max_size=20)), body, values


@SETTINGS
@given(valid_events())
def test_valid_events_decode_exactly(case):
    key, body, values = case
    decoded = decoder.decode(key.encode(), json.dumps(body).encode())
    assert decoded == Event(key, [float(v) for v in values], body.get("ts"), body.get("reset", False),
                            body.get("end", False))


def _break(body: dict, how: str, junk) -> tuple[dict | list | str, str]:
    """One way to make a valid event invalid, and the reason it must get."""
    features = list(body["features"].values()) if isinstance(body["features"], dict) else body["features"]
    if how == "extra_field":
        return {**body, "colour": junk}, "unknown_field"
    if how == "no_features":
        return {k: v for k, v in body.items() if k not in ("features", "reset", "end")}, "missing_features"
    if how == "control":
        return {**body, "reset": junk}, "bad_control"
    if how == "count":
        return {**body, "features": features + [1.0]}, "wrong_feature_count"
    if how == "unknown_name":
        return {**body, "features": {**dict(zip(NAMES, features)), "wind": 1.0}}, "unknown_feature"
    if how == "missing_name":
        return {**body, "features": dict(zip(NAMES[:2], features))}, "missing_feature"
    if how == "text_value":
        return {**body, "features": [str(junk)] + features[1:]}, "non_numeric_feature"
    if how == "non_finite":
        return {**body, "features": features[:2] + [junk]}, "non_finite_feature"
    if how == "ts":
        return {**body, "ts": str(junk)}, "bad_ts"
    if how == "not_object":
        return [features], "not_object"
    raise AssertionError(how)


HOWS = ["extra_field", "no_features", "control", "count", "unknown_name", "missing_name", "text_value", "ts", "not_object"]


@SETTINGS
@given(valid_events(), st.sampled_from(HOWS + ["non_finite"]), st.text(max_size=5),
       st.sampled_from([math.nan, math.inf, -math.inf, 10**400, 1e39, -1e300]))
def test_each_invalid_event_gets_its_reason(case, how, junk, bad_number):
    key, body, _ = case
    broken, reason = _break(body, how, bad_number if how == "non_finite" else junk)
    decoded = decoder.decode(key.encode(), json.dumps(broken).encode())
    assert isinstance(decoded, Rejection) and decoded.reason == reason, (broken, decoded)


@SETTINGS
@given(st.one_of(st.none(), st.binary(max_size=30)),
       st.one_of(st.none(), st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())))
def test_arbitrary_input_never_raises(key, value):
    decoded = decoder.decode(key, value)
    assert isinstance(decoded, Event) or (isinstance(decoded, Rejection) and decoded.reason in REASONS)
