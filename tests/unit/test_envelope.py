from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpfleet.envelope import (
    Kind,
    QueuedMessage,
    choose_shard,
    dedupe_fingerprint,
    new_qid,
    shard_of,
)
from smtpfleet.queue.keys import Keys


def test_qid_names_its_shard() -> None:
    for shard in (0, 7, 63):
        assert shard_of(new_qid(shard)) == shard


@pytest.mark.parametrize("bad", ["", "abc", "x.1", "1.", "1.a-b", "../1"])
def test_shard_of_rejects_foreign_ids(bad: str) -> None:
    with pytest.raises(ValueError, match="queue id"):
        shard_of(bad)


def test_fingerprint_ignores_recipient_order_and_domain_case_but_not_message_id() -> None:
    a = dedupe_fingerprint("<m@x>", "s@X", ("b@y", "a@Y"), content=b"hi")
    assert a == dedupe_fingerprint("<m@x>", "s@x", ("a@y", "b@y"), content=b"hi")
    assert a != dedupe_fingerprint("<other@x>", "s@x", ("a@y", "b@y"), content=b"hi")
    assert a != dedupe_fingerprint("<m@x>", "s@x", ("a@y",), content=b"hi")
    assert dedupe_fingerprint(None, "s@x", ("a@y",), content=b"hi") is None


def test_a_reused_message_id_with_other_content_or_local_part_is_another_message() -> None:
    """An alert's fixed Message-ID: each alert is delivered, not answered as a duplicate."""
    a = dedupe_fingerprint("<fixed@host>", "s@x", ("oncall@y",), content=b"Subject: 1\r\n")
    assert a != dedupe_fingerprint("<fixed@host>", "s@x", ("oncall@y",), content=b"Subject: 2\r\n")
    assert a != dedupe_fingerprint("<fixed@host>", "S@x", ("oncall@y",), content=b"Subject: 1\r\n")
    assert a != dedupe_fingerprint("<fixed@host>", "s@x", ("ONCALL@y",), content=b"Subject: 1\r\n")


@given(st.text(min_size=1), st.integers(min_value=1, max_value=4096))
def test_a_resend_lands_in_the_same_shard(message_id: str, shards: int) -> None:
    fingerprint = dedupe_fingerprint(message_id, "s@x", ("r@y",), content=b"")
    assert choose_shard(fingerprint, shards) == choose_shard(fingerprint, shards) < shards


def test_entry_round_trips() -> None:
    entry = QueuedMessage(
        "3.ABC", "", ("a@b",), 123, attempts=2, kind=Kind.DSN, last_errors={"a@b": "451 x"}
    )
    assert QueuedMessage.decode(entry.encode()) == entry
    again = entry.retry_of(("a@b",), {"a@b": "421 y"})
    assert again.attempts == 3
    assert again.last_errors == {"a@b": "421 y"}


def test_all_keys_of_a_shard_share_one_hash_tag() -> None:
    keys = Keys("pfx", 8)
    tagged = [keys.stream(5), keys.body(5, "5.X"), keys.retry(5), keys.dedupe(5, "f"), keys.dead(5)]
    assert {k.split("}")[0] + "}" for k in tagged} == {"{pfx:5}"}
