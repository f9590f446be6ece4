"""Key names and their parsing live in one place (Keys)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpfleet.health.state import view_ttl_ms
from smtpfleet.queue.keys import Keys


@given(
    prefix=st.from_regex(r"[a-z][a-z0-9:._-]{0,12}", fullmatch=True),
    shards=st.integers(1, 256),
    data=st.data(),
)
def test_a_stream_key_names_its_shard(prefix: str, shards: int, data: st.DataObject) -> None:
    keys = Keys(prefix, shards)
    shard = data.draw(st.integers(0, shards - 1))
    assert keys.shard_of_stream(keys.stream(shard)) == shard


@pytest.mark.parametrize(
    "key", ["{sf:1}:retry", "{other:1}:stream", "{sf:9}:stream", "{sf:x}:stream", "stream"]
)
def test_anything_but_one_of_our_stream_keys_is_refused(key: str) -> None:
    with pytest.raises(ValueError, match="not a stream key"):
        Keys("sf", 4).shard_of_stream(key)


def test_a_published_view_outlives_a_few_slow_checks() -> None:
    assert view_ttl_ms(1.0) == 10_000
    assert view_ttl_ms(0.2) == 6_000
