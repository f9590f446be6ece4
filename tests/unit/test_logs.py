"""JSON log lines: one object per record, event fields at the top level, UTC timestamps."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from smtpfleet.logs import JsonFormatter, _iso_utc


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_timestamps_match_datetime_to_the_millisecond(created: float) -> None:
    expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    assert _iso_utc(created) == expected


def test_a_record_is_one_json_object_with_its_event_fields() -> None:
    record = logging.LogRecord("smtpfleet.x", logging.INFO, "f.py", 1, "sent %s", ("it",), None)
    record.event = "delivery.attempt"
    record.qid = "q1"
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["msg"] == "sent it"
    assert (entry["event"], entry["qid"], entry["level"]) == ("delivery.attempt", "q1", "info")
    assert entry["ts"] == datetime.fromtimestamp(record.created, UTC).isoformat(
        timespec="milliseconds"
    )
