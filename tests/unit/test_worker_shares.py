"""`serve --workers N`: each worker's share of the node's session cap and receiving budget."""

from __future__ import annotations

from smtpfleet.config import build_config
from smtpfleet.supervisor import worker_shares


def test_the_node_limits_are_split_over_the_workers() -> None:
    config = build_config(
        {"inbound": {"max_sessions": 1001, "max_receiving_bytes": 300_000_000}}, {}
    )
    assert worker_shares(config, 2) == {
        "SMTPFLEET_INBOUND__MAX_SESSIONS": "501",  # rounded up: never 0
        "SMTPFLEET_INBOUND__MAX_RECEIVING_BYTES": "150000000",
    }


def test_a_worker_can_still_receive_one_message_of_the_largest_size() -> None:
    config = build_config(
        {"inbound": {"max_message_bytes": 100_000_000, "max_receiving_bytes": 150_000_000}}, {}
    )
    shares = worker_shares(config, 4)
    assert shares["SMTPFLEET_INBOUND__MAX_RECEIVING_BYTES"] == "100000000"
    assert shares["SMTPFLEET_INBOUND__MAX_SESSIONS"] == "250"
