"""utc_timestamp's per-second cache gives exactly what datetime formatting gives."""

from __future__ import annotations

from datetime import datetime, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from retire_cluster.protocol.messages import utc_timestamp


def reference(epoch_s: float) -> str:
    dt = datetime.fromtimestamp(epoch_s, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@settings(max_examples=2000)
@given(st.floats(min_value=0, max_value=4e9, allow_nan=False) | st.integers(0, 4 * 10**12).map(lambda n: n / 1000))
def test_same_as_datetime(epoch_s: float) -> None:
    assert utc_timestamp(epoch_s) == reference(epoch_s)


def test_now_has_the_rfc3339_shape() -> None:
    stamp = utc_timestamp()
    assert len(stamp) == 24 and stamp[10] == "T" and stamp.endswith("Z")
