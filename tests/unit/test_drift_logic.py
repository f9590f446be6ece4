"""The routing configuration fingerprint and the drift report, on plain values."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from smtpfleet.cluster.drift import (
    Fingerprint,
    differences,
    distinct_fingerprints,
    drift_report,
    fingerprint,
    routing_sections,
)
from smtpfleet.config import Config, RelayConfig


def relay(name: str, **settings: Any) -> dict[str, Any]:
    return RelayConfig(name=name, host=f"{name}.example", **settings).model_dump(mode="json")


def sections(*relays: dict[str, Any], routing: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"relays": list(relays), "routing": routing or {"key": "recipient_domain"}}


def test_the_same_configuration_gives_the_same_short_digest() -> None:
    one = fingerprint(sections(relay("r1"), relay("r2")))
    two = fingerprint(sections(relay("r1"), relay("r2")))

    assert one == two
    assert len(one.digest) == 12
    assert set(one.parts) == {"relay r1", "relay r2", "routing"}


@settings(max_examples=30)
@given(st.permutations(["r1", "r2", "r3", "r4"]))
def test_relay_order_does_not_count(order: list[str]) -> None:
    assert fingerprint(sections(*(relay(n) for n in order))) == fingerprint(
        sections(*(relay(n) for n in sorted(order)))
    )


def test_lists_of_plain_values_are_sets_and_keys_are_unordered() -> None:
    a = relay("r1", egress_addresses=["192.0.2.1", "192.0.2.2"])
    b = relay("r1", egress_addresses=["192.0.2.2", "192.0.2.1"])
    reordered = dict(reversed(list(b.items())))

    assert fingerprint(sections(a)) == fingerprint(sections(reordered))


def test_a_list_of_rules_keeps_its_order() -> None:
    rules = [{"match": "a", "use": "x"}, {"match": "b", "use": "y"}]
    first = fingerprint({"relays": [], "rules": rules})
    second = fingerprint({"relays": [], "rules": list(reversed(rules))})

    assert first.parts["rules"] != second.parts["rules"]


def test_every_routing_setting_of_a_relay_counts() -> None:
    base = fingerprint(sections(relay("r1")))
    for change in (
        {"port": 2525},
        {"tls": "required"},
        {"max_connections": 3},
        {"priority": 20},
        {"password": "other", "username": "u"},
    ):
        changed = fingerprint(sections(relay("r1", **change)))
        assert changed.digest != base.digest, change
        assert differences(base, changed) == ["relay r1 settings differ"], change


def test_a_password_is_never_published_in_clear() -> None:
    secret = "hunter2-very-secret"
    published = json.dumps(fingerprint(sections(relay("r1", password=secret))).as_dict())

    assert secret not in published
    assert "hunter2" not in published


def test_routing_sections_take_relays_and_routing_from_the_config() -> None:
    config = Config.model_validate(
        {"relays": [{"name": "r1", "host": "h", "password": "p"}], "routing": {"warm_percent": 5}}
    )

    got = routing_sections(config)

    assert set(got) == {"relays", "routing"}
    assert got["routing"]["warm_percent"] == 5
    assert fingerprint(got) == fingerprint(routing_sections(config))


def test_differences_name_missing_extra_and_changed_parts() -> None:
    reference = fingerprint(sections(relay("r1"), relay("r2"), relay("r3")))
    other = fingerprint(
        sections(relay("r1", port=26), relay("r2"), relay("r4"), routing={"key": "sender_domain"})
    )

    assert differences(reference, other) == [
        "relay r1 settings differ",
        "relay r3 missing",
        "relay r4 extra",
        "routing differs",
    ]
    assert differences(reference, reference) == []


def test_the_report_names_the_odd_node_out() -> None:
    common = fingerprint(sections(relay("r1"), relay("r2")))
    odd = fingerprint(sections(relay("r1")))

    report = drift_report({"node-1": common, "node-2": odd, "node-3": common})

    assert report.distinct == 2
    assert report.reference == common.digest
    assert report.differing == {"node-2": ["relay r2 missing"]}
    assert report.lines() == ["node-2 differs: relay r2 missing"]
    assert report.as_dict()["drift"] is True


def test_a_tie_is_broken_by_the_node_that_sorts_first() -> None:
    a = fingerprint(sections(relay("r1"), relay("r2")))
    b = fingerprint(sections(relay("r1")))

    report = drift_report({"node-2": b, "node-1": a})

    assert report.differing == {"node-2": ["relay r2 missing"]}


def test_agreeing_nodes_and_no_nodes_are_no_drift() -> None:
    same = fingerprint(sections(relay("r1")))

    assert drift_report({"a": same, "b": same}).as_dict() == {
        "drift": False,
        "distinct": 1,
        "reference": same.digest,
        "differing": {},
    }
    assert drift_report({}).distinct == 0


def test_a_fingerprint_survives_its_published_form() -> None:
    fp = fingerprint(sections(relay("r1")))

    assert Fingerprint.from_dict(json.loads(json.dumps(fp.as_dict()))) == fp
    assert Fingerprint.from_dict({"digest": 3}) is None


def test_distinct_fingerprints_count_this_node_and_its_peers() -> None:
    assert distinct_fingerprints("a", {}) == 1
    assert distinct_fingerprints("a", {"n2": "a", "n3": "b"}) == 2
