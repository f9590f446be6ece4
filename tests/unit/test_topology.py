"""The Redis topology `status` shows, from plain replies: lag, shard -> slot -> primary."""

from __future__ import annotations

import pytest

from smtpfleet.queue.keys import Keys
from smtpfleet.queue.topology import (
    ClusterNode,
    Replica,
    SentinelAnswer,
    agreed_primary,
    cluster_replicas,
    compact_ranges,
    key_slot,
    lag_bytes,
    must_confirm,
    parse_cluster_nodes,
    replica_states,
    replicas_from_info,
    role_name,
    shard_slots,
    shards_by_primary,
    with_known_replicas,
)

# What redis-py makes of INFO replication on a primary with one replica in sync, one behind.
PRIMARY_INFO = {
    "role": "master",
    "connected_slaves": 2,
    "master_repl_offset": 5000,
    "slave0": {"ip": "10.0.0.2", "port": 6379, "state": "online", "offset": 5000, "lag": 0},
    "slave1": {"ip": "10.0.0.3", "port": 6379, "state": "online", "offset": 3800, "lag": 4},
    "slave_read_only": 1,  # not a replica row, though it starts with "slave"
}

CLUSTER_NODES = """\
a1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460
a2 127.0.0.1:30002@40002 master - 0 1 2 connected 5461-10922
a3 127.0.0.1:30003@40003 master - 0 1 3 connected 10923-16383 [77->-a1]
b1 127.0.0.1:30004@40004 slave a1 0 1 1 connected
b2 127.0.0.1:30005@40005 slave a2 0 1 2 connected
b3 127.0.0.1:30006@40006 slave,fail a3 0 1 3 disconnected
"""


def test_replicas_and_their_lag_come_from_the_primarys_info() -> None:
    assert role_name(PRIMARY_INFO) == "primary"
    assert role_name({"role": "slave"}) == "replica"
    assert replicas_from_info(PRIMARY_INFO) == [
        Replica("10.0.0.2:6379", "up", lag_bytes=0, last_ack_s=0),
        Replica("10.0.0.3:6379", "up", lag_bytes=1200, last_ack_s=4),
    ]


def test_an_unparsed_replica_row_and_a_syncing_replica() -> None:
    info = {
        "role": "master",
        "master_repl_offset": "900",
        "slave0": "ip=10.0.0.9,port=7000,state=wait_bgsave,offset=0,lag=12",
    }
    assert replicas_from_info(info) == [Replica("10.0.0.9:7000", "wait_bgsave", 900, 12)]


@pytest.mark.parametrize(
    ("primary", "replica", "lag"), [(10, 4, 6), (10, 12, 0), (None, 3, None), (5, None, None)]
)
def test_lag_is_the_offset_difference_never_negative(
    primary: int | None, replica: int | None, lag: int | None
) -> None:
    assert lag_bytes(primary, replica) == lag


def test_a_replica_only_sentinel_or_the_cluster_knows_is_shown_down() -> None:
    listed = [Replica("10.0.0.2:6379", "up", 0, 0)]
    merged = with_known_replicas(listed, ["10.0.0.2:6379", "10.0.0.4:6379"])
    assert merged == (listed[0], Replica("10.0.0.4:6379", "down"))


def test_the_sentinels_majority_names_the_primary() -> None:
    answers = [
        SentinelAnswer("s1:26379", primary="10.0.0.1:6379"),
        SentinelAnswer("s2:26379", error="TimeoutError"),
        SentinelAnswer("s3:26379", primary="10.0.0.2:6379"),
        SentinelAnswer("s4:26379", primary="10.0.0.2:6379"),
    ]
    assert agreed_primary(answers) == "10.0.0.2:6379"
    assert agreed_primary([SentinelAnswer("s1:26379", error="refused")]) is None
    replies = [{"ip": "10.0.0.3", "port": 6379}, {"ip": "10.0.0.2", "port": 6379}]
    assert [s.address for s in replica_states(replies)] == ["10.0.0.3:6379", "10.0.0.2:6379"]


def test_cluster_nodes_are_parsed_with_slots_and_replicas() -> None:
    nodes = parse_cluster_nodes(CLUSTER_NODES)
    assert [n.address for n in nodes][:2] == ["127.0.0.1:30001", "127.0.0.1:30002"]
    assert nodes[2].slots == ((10923, 16383),)  # the migrating slot is not counted
    assert nodes[3].primary_id == "a1"
    assert [n.serving_primary for n in nodes] == [True, True, True, False, False, False]
    assert cluster_replicas(nodes, nodes[0]) == ["127.0.0.1:30004"]


@pytest.mark.parametrize(
    ("key", "slot"),
    [
        ("foo", 12182),  # CLUSTER KEYSLOT foo
        ("bar", 5061),
        ("{smtpfleet:0}:stream", 1633),
        ("{smtpfleet:0}:retry", 1633),  # same hash tag, same slot
    ],
)
def test_key_slot_follows_the_hash_tag(key: str, slot: int) -> None:
    assert key_slot(key) == slot


def test_key_slot_of_an_empty_tag_is_the_whole_keys() -> None:
    assert key_slot("a{}b") != key_slot("")
    assert key_slot("{user}x") == key_slot("user")


def test_every_shard_is_held_by_exactly_one_live_primary() -> None:
    nodes = parse_cluster_nodes(CLUSTER_NODES)
    slots = shard_slots(Keys("smtpfleet", 64))
    held, unassigned = shards_by_primary(nodes, slots)
    assert unassigned == ()
    assert sorted(s for shards in held.values() for s in shards) == list(range(64))
    assert set(held) == {"127.0.0.1:30001", "127.0.0.1:30002", "127.0.0.1:30003"}
    assert all(shards for shards in held.values())  # 64 shards reach every primary


def test_shards_of_a_failed_primary_are_unassigned() -> None:
    failed = CLUSTER_NODES.replace("master - 0 1 2", "master,fail - 0 1 2")
    held, unassigned = shards_by_primary(
        parse_cluster_nodes(failed), shard_slots(Keys("smtpfleet", 64))
    )
    assert "127.0.0.1:30002" not in held
    assert unassigned
    assert all(5461 <= key_slot(Keys("smtpfleet", 64).stream(s)) <= 10922 for s in unassigned)


def test_cluster_node_flags() -> None:
    node = ClusterNode("x", "h:1", frozenset({"master", "fail?"}), None, ((0, 1),))
    assert not node.serving_primary


def test_compact_ranges() -> None:
    assert compact_ranges([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert compact_ranges([]) == ""
    assert compact_ranges([3]) == "3"


def test_a_write_must_reach_every_in_sync_replica_a_failover_could_promote() -> None:
    replies = [
        {"ip": "h", "port": 1, "flags": "slave", "slave-priority": 100,
         "master-link-status": "ok"},
        {"ip": "h", "port": 2, "flags": "slave,disconnected,promoted", "slave-priority": 100,
         "master-link-status": "ok"},  # being promoted: the Sentinel's own link, still counts
        {"ip": "h", "port": 3, "flags": "s_down,slave,disconnected",
         "master-link-status": "ok"},  # down
        {"ip": "h", "port": 4, "flags": "slave", "slave-priority": 0,
         "master-link-status": "ok"},  # never promoted
        {"ip": "h", "port": 5, "flags": "slave,o_down"},
        {"ip": "h", "port": 6, "flags": "slave", "slave-priority": 100,
         "master-link-status": "err"},  # syncing: picked only after the in-sync ones
        {"ip": "h", "port": 7, "flags": "slave", "slave-priority": 10,
         "master-link-status": "err"},  # out of sync, but a failover would pick it first
    ]  # fmt: skip
    states = replica_states(replies)
    must = {s.address for s in states if must_confirm(s, states)}
    assert must == {"h:1", "h:2", "h:7"}


def test_with_no_replica_in_sync_every_promotable_one_must_confirm() -> None:
    replies = [
        {"ip": "h", "port": 1, "flags": "slave", "master-link-status": "err"},
        {"ip": "h", "port": 2, "flags": "slave", "master-link-status": "err"},
    ]
    states = replica_states(replies)
    assert all(must_confirm(s, states) for s in states)  # nothing durable to confirm on
