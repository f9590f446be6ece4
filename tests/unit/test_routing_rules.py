"""Compliance routing (relays/rules.py): rule matching, per-recipient groups, and the property
that no recipient is ever routed outside its rule's relays, whatever is healthy."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpfleet.cli.ops import _waiting_line
from smtpfleet.config import RelayConfig, RetryConfig, RoutingConfig, build_config
from smtpfleet.delivery.classify import FailureKind, Outcome, Verdict, limit_reached
from smtpfleet.delivery.outcome import MAX_PARK_MS, PARK_MS, Attempt, plan_outcome
from smtpfleet.envelope import QueuedMessage
from smtpfleet.errors import ConfigError
from smtpfleet.relays.ring import Ring
from smtpfleet.relays.rules import UNRESTRICTED, Router, domain_matches, rule_for

RELAYS = [
    RelayConfig(name="eu-aws", host="h", region="eu", provider="aws", tags=["hipaa"]),
    RelayConfig(name="eu-gcp", host="h", region="eu", provider="gcp"),
    RelayConfig(name="us-aws", host="h", region="us", provider="aws", tags=["hipaa"]),
    RelayConfig(name="us-az", host="h", region="us", provider="azure", priority=20),
]
NAMES = {r.name for r in RELAYS}
RULES: list[dict[str, Any]] = [
    {"name": "hipaa", "tenants": ["clinic"], "relays": {"tags": ["hipaa"]}},
    {"name": "eu", "recipient_domains": ["*.eu.example", "eu.example"], "relays": {"region": "eu"}},
    {"name": "gcp", "sender_domains": ["gcp.example"], "relays": {"provider": ["gcp"]}},
]


def routing(rules: list[dict[str, Any]] = RULES) -> RoutingConfig:
    return RoutingConfig.model_validate({"rules": rules})


def router(rules: list[dict[str, Any]] = RULES) -> Router:
    return Router(Ring(RELAYS), RELAYS, routing(rules))


def message(sender: str, *recipients: str, tenant: str | None = None) -> QueuedMessage:
    return QueuedMessage("0.A", sender, recipients, 0, tenant=tenant)


def test_domains_match_exactly_or_by_subdomain_wildcard() -> None:
    assert domain_matches("eu.example", ["eu.example"])
    assert domain_matches("a.b.eu.example", ["*.eu.example"])
    assert not domain_matches("eu.example", ["*.eu.example"])
    assert not domain_matches("neu.example", ["*.eu.example", "eu.example"])


@pytest.mark.parametrize(
    ("sender", "recipient", "tenant", "expected"),
    [
        ("a@x.example", "b@y.example", "clinic", "hipaa"),  # first match wins over "eu"
        ("a@x.example", "b@mail.eu.example", "clinic", "hipaa"),
        ("a@x.example", "b@mail.eu.example", None, "eu"),
        ("a@gcp.example", "b@EU.example", "other", "eu"),  # domains compare case-blind
        ("a@gcp.example", "b@y.example", None, "gcp"),
        ("", "b@y.example", None, None),  # the null sender has no domain
        ("a@x.example", "b@y.example", None, None),
    ],
)
def test_first_matching_rule_decides(
    sender: str, recipient: str, tenant: str | None, expected: str | None
) -> None:
    rule = rule_for(routing().rules, sender, recipient, tenant)
    assert (rule.name if rule else None) == expected


def test_an_international_rule_domain_matches_its_mail() -> None:
    """Mail carries an internationalized domain as its A-label (SMTPUTF8 is not offered): a
    rule written with the U-label matched none of it, and its mail went to relays the rule
    forbids."""
    spelled = ["bücher.example", "*.Bücher.Example."]
    rules = routing([{"name": "idn", "recipient_domains": spelled, "relays": {"region": "eu"}}])
    assert rules.rules[0].recipient_domains == ["xn--bcher-kva.example", "*.xn--bcher-kva.example"]
    for recipient in ("b@xn--bcher-kva.example", "b@mail.XN--BCHER-KVA.example"):
        rule = rule_for(rules.rules, "a@x.example", recipient, None)
        assert rule is not None
        assert rule.name == "idn"


@pytest.mark.parametrize("domain", ["exa mple.com", "a..example", "*.", "-x.example"])
def test_a_rule_domain_that_is_no_domain_is_a_config_error(domain: str) -> None:
    """It matched nothing, silently: the rule's mail went anywhere."""
    with pytest.raises(ValueError, match="is not a domain name"):
        routing([{"name": "bad", "sender_domains": [domain], "relays": {"region": "eu"}}])


def test_every_condition_of_a_rule_must_hold() -> None:
    rules = routing(
        [
            {
                "name": "both",
                "sender_domains": "a.example",
                "tenants": "t",
                "relays": {"names": "eu-gcp"},
            }
        ]
    ).rules
    assert rule_for(rules, "x@a.example", "y@b.example", "t") is not None
    assert rule_for(rules, "x@a.example", "y@b.example", None) is None
    assert rule_for(rules, "x@c.example", "y@b.example", "t") is None


def test_recipients_are_grouped_per_rule_and_routed_inside_their_set() -> None:
    routes = router().routes(
        message("a@x.example", "p@eu.example", "q@y.example", "r@eu.example"), NAMES
    )
    by_rule = {route.rule: route for route in routes}
    assert by_rule["eu"].recipients == ("p@eu.example", "r@eu.example")
    assert {r.name for r in by_rule["eu"].order} == {"eu-aws", "eu-gcp"}
    assert by_rule[UNRESTRICTED].recipients == ("q@y.example",)
    assert {r.name for r in by_rule[UNRESTRICTED].order} == NAMES


def test_a_rule_whose_relays_are_all_down_waits_instead_of_leaking() -> None:
    (route,) = router().routes(
        message("a@x.example", "b@y.example", tenant="clinic"), {"eu-gcp", "us-az"}
    )
    assert route.rule == "hipaa"
    assert route.order == ()
    assert "routing rule hipaa" in route.waiting_reason


def test_the_tiers_apply_inside_the_rules_set() -> None:
    rules = [{"name": "us", "relays": {"region": "us"}}]
    (route,) = router(rules).routes(message("a@x.example", "b@y.example"), NAMES)
    assert [r.name for r in route.order] == ["us-aws", "us-az"]  # tier 10 first, then 20


def test_entries_carry_the_tenant_and_old_entries_have_none() -> None:
    with_tenant = message("a@x.example", "b@y.example", tenant="clinic")
    assert QueuedMessage.decode(with_tenant.encode()).tenant == "clinic"
    old = '{"q":"0.A","f":"a@x","r":["b@y"],"t":1,"a":0,"k":"mail","e":{}}'
    assert QueuedMessage.decode(old).tenant is None
    assert '"n"' not in message("a@x", "b@y").encode()


def test_a_rule_whose_selector_matches_no_relay_is_a_config_error() -> None:
    relays = [{"name": "a", "host": "h", "region": "eu"}]
    build_config(
        {"relays": relays, "routing": {"rules": [{"name": "ok", "relays": {"region": "eu"}}]}}
    )
    with pytest.raises(ConfigError, match=r"routing\.rules hipaa: the selector matches no relay"):
        build_config(
            {
                "relays": relays,
                "routing": {"rules": [{"name": "hipaa", "relays": {"tags": ["hipaa"]}}]},
            }
        )
    with pytest.raises(ConfigError, match="at least one of"):
        build_config({"relays": relays, "routing": {"rules": [{"name": "x", "relays": {}}]}})


ADDRESSES = st.sampled_from(
    ["a@x.example", "b@eu.example", "c@m.eu.example", "d@gcp.example", "e@y.example", ""]
)


@given(
    sender=ADDRESSES,
    recipients=st.lists(ADDRESSES.filter(bool), min_size=1, max_size=5),
    tenant=st.sampled_from([None, "clinic", "other"]),
    healthy=st.sets(st.sampled_from(sorted(NAMES))),
    load=st.dictionaries(st.sampled_from(sorted(NAMES)), st.integers(0, 50)),
)
@settings(max_examples=300, deadline=None)
def test_no_recipient_is_ever_routed_outside_its_eligible_set(
    sender: str, recipients: list[str], tenant: str | None, healthy: set[str], load: dict[str, int]
) -> None:
    rules = routing().rules
    routes = router().routes(message(sender, *recipients, tenant=tenant), healthy, load)
    assert sorted(r for route in routes for r in route.recipients) == sorted(recipients)
    for route in routes:
        for recipient in route.recipients:
            rule = rule_for(rules, sender, recipient, tenant)
            allowed = {r.name for r in RELAYS if rule is None or rule.relays.selects(r)}
            assert {relay.name for relay in route.order} <= allowed & healthy
            # ... and it waits only when none of its relays is healthy.
            assert bool(route.order) == bool(allowed & healthy)


def test_waiting_recipients_are_parked_with_their_reason_and_no_attempt() -> None:
    (route,) = router().routes(message("a@x.example", "b@y.example", tenant="clinic"), set())
    verdict = Verdict(Outcome.TEMPORARY, FailureKind.NO_ROUTE, None, route.waiting_reason, "4.4.1")
    plan = plan_outcome(
        message("a@x.example", "b@y.example", tenant="clinic"),
        {"b@y.example": Attempt(verdict, None)},
        now_ms=1000,
        retry=RetryConfig(),
    )
    assert plan.retry is not None
    assert plan.retry.attempts == 0
    assert plan.retry.tenant == "clinic"
    assert plan.retry_due_ms == 1000 + PARK_MS
    assert plan.retry.last_errors == {"b@y.example": route.waiting_reason}


def test_status_says_which_rule_mail_waits_for() -> None:
    assert _waiting_line({}) == ""
    assert _waiting_line({"hipaa": 3}).endswith("routing rule (last 5 min, recipients): hipaa 3")


def test_mail_waiting_for_its_rules_relays_is_read_less_often_as_its_wait_grows() -> None:
    """A long outage of a rule's relays re-read every waiting message every 2 s (issue #14)."""
    (route,) = router().routes(message("a@x.example", "b@y.example", tenant="clinic"), set())
    verdict = Verdict(Outcome.TEMPORARY, FailureKind.NO_ROUTE, None, route.waiting_reason, "4.4.1")
    waiting = {"b@y.example": Attempt(verdict, None)}
    fresh = message("a@x.example", "b@y.example", tenant="clinic")

    def due_after(age_ms: int, attempts: dict[str, Attempt]) -> int:
        now = fresh.accepted_ms + age_ms
        plan = plan_outcome(fresh, attempts, now_ms=now, retry=RetryConfig())
        return plan.retry_due_ms - now

    assert due_after(1_000, waiting) == PARK_MS
    assert due_after(100_000, waiting) == 10_000  # a tenth of its wait
    assert due_after(3_600_000, waiting) == MAX_PARK_MS
    # Our own connection limit frees up in seconds, however old the message.
    limited = {"b@y.example": Attempt(limit_reached(), None)}
    assert due_after(3_600_000, limited) == PARK_MS
