"""utc_timestamp's caches (per second, and the last millisecond) give exactly what datetime formatting gives."""

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


@settings(max_examples=1000)
@given(st.floats(min_value=0, max_value=4e9, allow_nan=False), st.lists(st.floats(0, 0.003), min_size=1, max_size=8))
def test_stamps_in_the_same_millisecond_come_from_the_last_one_and_are_still_exact(epoch_s, steps) -> None:
    """A burst of stamps close together (the last millisecond's stamp is reused): each is still exact."""
    for step in [0.0, *steps]:
        assert utc_timestamp(epoch_s + step) == reference(epoch_s + step)
        assert utc_timestamp(epoch_s) == reference(epoch_s)  # and back: the cache is only the last one


def test_a_burst_in_one_millisecond_shares_one_stamp() -> None:
    first = utc_timestamp(1_800_000_000.1231)
    assert utc_timestamp(1_800_000_000.1234) is first  # no formatting at all
    assert utc_timestamp(1_800_000_000.1241) == "2027-01-15T08:00:00.124Z"
