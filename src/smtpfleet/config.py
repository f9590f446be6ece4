"""Configuration: one YAML file, every key overridable from the environment, validated once.

`load_config` is pure apart from reading the file: it merges the YAML document with
`SMTPFLEET_*` environment variables (``SMTPFLEET_QUEUE__DURABILITY=fsync`` sets
``queue.durability``; a numeric segment indexes a list: ``SMTPFLEET_RELAYS__0__PORT=2526``),
validates the result into a frozen tree, and reports every problem at once, naming each key
(and the variable, for a value from the environment). The file is read strictly
(config_yaml.py: no repeated key), a variable by its key's type (config_env.py), and values
with a syntax of their own are checked by config_values.py.
"""

from __future__ import annotations

import collections
import copy
import ipaddress
import os
from collections.abc import Iterable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Final, get_args
from urllib.parse import urlparse

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from smtpfleet.config_env import Overlay, overlay_environment
from smtpfleet.config_tls import describe_pair_failure as describe_pair_failure
from smtpfleet.config_values import (
    domain_name as domain_name,
)
from smtpfleet.config_values import (
    domain_pattern,
    mailbox,
    network,
    redis_database,
    relay_host,
    smtp_domain,
)
from smtpfleet.config_yaml import YamlProblem, parse_yaml
from smtpfleet.errors import ConfigError

ENV_PREFIX = "SMTPFLEET_"
ENV_SEPARATOR = "__"
# SMTPFLEET_* variables that are not configuration keys (read by the CLI and the tools).
WORKERS_ENV = "SMTPFLEET_WORKERS"  # `serve --workers`: the supervisor's, never a worker's
RESERVED_ENV = frozenset(
    {
        "SMTPFLEET_CONFIG",
        "SMTPFLEET_LOG_LEVEL",
        "SMTPFLEET_LOG_FORMAT",
        "SMTPFLEET_REDIS_SERVER",
        "SMTPFLEET_REDIS_TLS_SERVER",  # a Redis built with TLS, for tests (testing/redis_server)
        "SMTPFLEET_KEEP_WORKDIR",
        "SMTPFLEET_PARENT_PID",
        "SMTPFLEET_FAKE_KUBECTL_STATE",  # testing/fake_kubectl
        "SMTPFLEET_FUZZ_SEED",  # tests/integration/test_fuzz.py, inherited by its nodes
        "SMTPFLEET_RELAY_FUZZ_SEEDS",  # tests/integration/test_relay_fuzz.py
        WORKERS_ENV,
    }
)

# Durations: every float of the schema is finite (allow_inf_nan below: `.inf` passed as "> 0"
# and then crashed `serve` in int(x * 1000) or never timed out), and a duration is at most a
# year: a longer one is a typo, and the millisecond arithmetic of timers and Redis expiries
# overflows long before 1e300.
MAX_DURATION_S: Final = 366 * 24 * 3600.0
Seconds = Annotated[float, Field(gt=0, le=MAX_DURATION_S)]
# A count beyond 2**31 - 1 is a typo, and some reach where they cannot work: a BLOCK or a
# WAITAOF timeout Redis refuses, a semaphore no machine fills. Sizes in bytes go further.
MAX_COUNT: Final = 2**31 - 1
MAX_BYTES: Final = 2**40
PositiveInt = Annotated[int, Field(gt=0, le=MAX_COUNT)]
NonNegativeInt = Annotated[int, Field(ge=0, le=MAX_COUNT)]  # 0: unlimited, or off
Bytes = Annotated[int, Field(gt=0, le=MAX_BYTES)]
Port = Annotated[int, Field(ge=1, le=65535)]  # one we connect to (a listener may bind 0)
# Below this even a Redis on the same host misses it while a node starts (0.001 s: a raw
# TimeoutError at `serve` start; 0.1 s: the first stream reads time out); 0.2 s keeps up.
MIN_SOCKET_TIMEOUT_S: Final = 0.2


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic takes `true` as 1 and `false` as 0: `port: true` was a relay on port 1."""
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if annotation is not bool and bool not in get_args(annotation):
                raise ValueError("must not be true or false")
        return value


def parse_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port`` (or a bare host when a default port is given)."""
    text = value.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"{value!r}: missing host")
    if not port_text:
        if default_port is None:
            raise ValueError(f"{value!r}: expected HOST:PORT")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: port must be a number from 0 to 65535")
    return host, int(port_text)


class NodeConfig(_Section):
    id: str = Field(default="", description="unique node id; default: hostname-pid")
    hostname: str = Field(default="", description="name in the banner and Received headers")
    # SIGTERM: how long SMTP sessions and deliveries in flight may take to finish.
    drain_grace_s: Seconds = 30.0
    # How long `serve` waits for Redis at start before giving up (a clear error, exit 1).
    startup_timeout_s: Seconds = 30.0
    # The region this node runs in: the ring prefers relays whose `region` label is this one;
    # other regions' relays follow as further tiers ("": no preference).
    region: str = ""

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        return smtp_domain(value) if value else value


class ListenerProfile(StrEnum):
    MX = "mx"  # port 25: mail for the accepted domains (and relay_networks), no AUTH
    SUBMISSION = "submission"  # port 587/465: AUTH required, offered only under TLS (RFC 6409)


class ListenerConfig(_Section):
    """One SMTP listener: an address and what is expected of clients there."""

    address: str
    profile: ListenerProfile = ListenerProfile.MX
    # TLS from the first byte, no STARTTLS (RFC 8314 "implicit TLS", port 465).
    implicit_tls: bool = False
    # Every command but EHLO, STARTTLS, NOOP and QUIT needs TLS first: 530 5.7.0 (RFC 3207 §4).
    require_tls: bool = False
    # The connection starts with a PROXY protocol v1/v2 header, sent by one of trusted_proxies.
    proxy_protocol: bool = False

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        parse_hostport(value)
        return value

    @property
    def hostport(self) -> tuple[str, int]:
        return parse_hostport(self.address)


class InboundTlsConfig(_Section):
    """The certificate the listeners present (PEM files, e.g. a mounted Kubernetes secret)."""

    cert_file: str = ""  # the chain, leaf first
    key_file: str = ""
    # 80 random bytes (`openssl rand 80`) shared by every node, so a sender resumes its TLS
    # session on any of them (inbound/tls_tickets.py). Empty: `serve --workers` makes one for
    # its workers at start, and separate nodes each have their own.
    ticket_key_file: str = ""
    # How often the files are checked for a change; a changed pair is loaded for new sessions.
    reload_interval_s: Seconds = 10.0

    @model_validator(mode="after")
    def _both_or_neither(self) -> InboundTlsConfig:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together")
        if self.ticket_key_file and not self.cert_file:
            raise ValueError("ticket_key_file needs cert_file and key_file")
        return self


class InboundAuthConfig(_Section):
    """SMTP AUTH (PLAIN, LOGIN) on submission listeners, only under TLS."""

    # Lines of "user:hash" (argon2id, as argon2-cffi's PasswordHasher writes them).
    users_file: str = ""
    reload_interval_s: Seconds = 10.0
    # Failed attempts per client IP, across the cluster (Redis), within the window: the one
    # that reaches max_failures and every AUTH after it until the window ends get 421 4.7.0.
    max_failures: PositiveInt = 5
    failure_window_s: Seconds = 300.0


class InboundLimitsConfig(_Section):
    """Per client IP, counted for the whole cluster in Redis (per node while Redis is away)."""

    # Concurrent sessions of one client on all nodes together; the next is told 421 4.7.0
    # instead of the banner. 0: unlimited.
    sessions: NonNegativeInt = 20
    # MAIL commands of one client in the last minute on all nodes: the next gets 451 4.7.1.
    messages_per_minute: NonNegativeInt = 120
    # Recipients accepted from one client in the last minute on all nodes: 451 4.7.1.
    recipients_per_minute: NonNegativeInt = 1000
    # Clients in relay_networks (our own systems) are not limited.
    exempt_relay_networks: bool = True
    # An IPv6 client counts as its network of this length: one host often holds a whole /64.
    ipv6_prefix_length: Annotated[int, Field(ge=1, le=128)] = 64
    # A session is counted under a lease this long, renewed while it lives: the sessions of a
    # node that died stop counting at most this long after it.
    session_lease_s: Annotated[float, Field(ge=3, le=MAX_DURATION_S)] = 60.0
    # A Redis answer slower than this is not waited for: this node's own counts decide.
    redis_timeout_s: Annotated[float, Field(gt=0, le=5)] = 0.5


class InboundConfig(_Section):
    # Listeners with the mx profile. Ignored when `listeners` is given and `listen` is not.
    listen: list[str] = Field(default_factory=lambda: ["127.0.0.1:2525"])
    listeners: list[ListenerConfig] = Field(default_factory=list)
    tls: InboundTlsConfig = InboundTlsConfig()
    auth: InboundAuthConfig = InboundAuthConfig()
    limits: InboundLimitsConfig = InboundLimitsConfig()
    # Who may send a PROXY header on a listener with proxy_protocol (load balancers).
    trusted_proxies: list[str] = Field(default_factory=list)
    # A PROXY header (and an implicit TLS handshake) must arrive within this.
    proxy_timeout_s: Seconds = 5.0
    accepted_domains: list[str] = Field(default_factory=list)
    relay_networks: list[str] = Field(default_factory=list)
    max_message_bytes: Bytes = 25 * 1024 * 1024
    max_recipients: Annotated[int, Field(ge=100, le=MAX_COUNT)] = 100
    max_received_headers: PositiveInt = 30
    idle_timeout_s: Seconds = 300.0
    # During DATA, fewer bytes than this per second over data_rate_window_s (measured once a
    # whole window has passed) is a client holding the session: 421 4.4.2, closed. 0: off.
    min_data_rate_bps: NonNegativeInt = 500
    data_rate_window_s: Annotated[float, Field(ge=1, le=MAX_DURATION_S)] = 10.0
    max_sessions: PositiveInt = 1000
    # Message bytes all sessions of a node may hold while receiving and queueing them; a
    # message that would pass it gets 452 and is sent again later. At least one whole message.
    max_receiving_bytes: Bytes = 256 * 1024 * 1024
    # Must stay well under 10 s so a client sees 451 before common client timeouts.
    accept_timeout_s: Annotated[float, Field(gt=0, le=10)] = 8.0

    @field_validator("listen")
    @classmethod
    def _listen_addresses(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_hostport(item)
        return value

    @field_validator("relay_networks", "trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return [network(item) for item in value]

    @field_validator("accepted_domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        # A typo here (`example..com`, an address literal) matched nothing, silently: all mail
        # for the domain would be refused as relaying.
        return [domain_name(d, min_labels=1) for d in value]

    @model_validator(mode="after")
    def _budget_holds_a_message(self) -> InboundConfig:
        if self.max_receiving_bytes < self.max_message_bytes:
            raise ValueError("max_receiving_bytes must be at least max_message_bytes")
        return self

    @model_validator(mode="after")
    def _listeners_have_what_they_need(self) -> InboundConfig:
        listeners = self.all_listeners()
        if not listeners:
            raise ValueError("no listener: give inbound.listen or inbound.listeners")
        needs_tls = [
            x.address
            for x in listeners
            if x.implicit_tls or x.require_tls or x.profile is ListenerProfile.SUBMISSION
        ]
        if needs_tls and not self.tls.cert_file:
            raise ValueError(f"tls.cert_file and tls.key_file are needed by {', '.join(needs_tls)}")
        if not self.auth.users_file and any(
            x.profile is ListenerProfile.SUBMISSION for x in listeners
        ):
            raise ValueError("auth.users_file is needed by a submission listener")
        if not self.trusted_proxies and any(x.proxy_protocol for x in listeners):
            raise ValueError("trusted_proxies is needed by a listener with proxy_protocol")
        return self

    def all_listeners(self) -> list[ListenerConfig]:
        """`listen` (as mx listeners, unless only `listeners` was given), then `listeners`."""
        legacy = self.listen if "listen" in self.model_fields_set or not self.listeners else []
        return [ListenerConfig(address=a) for a in legacy] + list(self.listeners)

    def listen_addresses(self) -> list[tuple[str, int]]:
        return [listener.hostport for listener in self.all_listeners()]


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# Of the socket timeout, what a command waiting in Redis leaves for its answer to come back
# (a busy server, a slow link): a quarter, and at least this long.
SERVER_ANSWER_SHARE = 0.25
SERVER_ANSWER_MIN_MS = 250


class RedisConfig(_Section):
    url: str = "redis://127.0.0.1:6379/0"
    prefix: str = Field(default="smtpfleet", pattern=r"^[A-Za-z0-9_.:-]+$")
    shards: Annotated[int, Field(ge=1, le=4096)] = 16
    socket_timeout_s: Annotated[float, Field(ge=MIN_SOCKET_TIMEOUT_S, le=MAX_DURATION_S)] = 5.0
    max_connections: PositiveInt = 64
    # Sentinel: when set, the primary of `master_name` is found through these (HOST:PORT) and
    # followed across failovers; `url` then only gives the database number and TLS (rediss://).
    sentinels: list[str] = Field(default_factory=list)
    master_name: str = "smtpfleet"
    # Credentials of the data nodes (ACL user and password) and of the Sentinels; a password
    # in `url` works too. Never logged.
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = Field(default=None, repr=False)
    # Redis Cluster: `url`'s host (and `cluster_nodes`, HOST:PORT) are the seed nodes; the
    # client learns the rest. Every shard lives in one hash slot; use 64 or more shards.
    cluster: bool = False
    cluster_nodes: list[str] = Field(default_factory=list)
    # TLS to the data nodes (a `rediss://` url): the CA bundle (PEM) that signed the server's
    # certificate ("": the system CAs), and a client certificate and key when the server asks
    # for one (`tls-auth-clients yes`). The server's name in `url` is verified.
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""

    @model_validator(mode="after")
    def _client_cert_pair(self) -> RedisConfig:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if (self.tls_ca_file or self.tls_cert_file) and not self.tls:
            raise ValueError("tls_ca_file, tls_cert_file and tls_key_file need a rediss:// url")
        return self

    @property
    def tls(self) -> bool:
        return urlparse(self.url).scheme == "rediss"

    def server_wait_ms(self, wanted_ms: int) -> int:
        """How long a command may wait inside Redis (XREADGROUP BLOCK, WAITAOF, WAIT): what
        is wanted, but short enough that the answer is back within the socket timeout. A
        quiet stream must come back empty, not as a timeout that drops the connection."""
        timeout_ms = self.socket_timeout_s * 1000
        margin_ms = max(timeout_ms * SERVER_ANSWER_SHARE, SERVER_ANSWER_MIN_MS)
        return max(1, min(wanted_ms, int(timeout_ms - margin_ms)))

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        # The URL itself stays out of the message: it may carry a password.
        try:
            parsed = urlparse(value)
            parsed.port  # noqa: B018 - raises on a port that is not one
        except ValueError as exc:
            raise ValueError(f"not a Redis URL ({exc})") from None
        if f"{parsed.scheme}://" not in REDIS_SCHEMES:
            raise ValueError(f"a Redis URL starts with {', '.join(REDIS_SCHEMES)}")
        redis_database(value)
        return value

    @field_validator("sentinels", "cluster_nodes")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_hostport(item)
        return value

    def describe(self) -> str:
        """Where the node's Redis is, for logs: never the credentials."""
        if self.sentinels:
            return f"sentinels {', '.join(self.sentinels)} (primary of {self.master_name!r})"
        if self.cluster:
            seeds = [self.url.rsplit("@", 1)[-1], *self.cluster_nodes]
            return f"cluster via {', '.join(seeds)}"
        return self.url.rsplit("@", 1)[-1]

    @model_validator(mode="after")
    def _one_topology(self) -> RedisConfig:
        if self.cluster and self.sentinels:
            raise ValueError("redis.cluster and redis.sentinels exclude each other")
        if self.cluster_nodes and not self.cluster:
            raise ValueError("redis.cluster_nodes needs redis.cluster: true")
        return self


class Durability(StrEnum):
    SERVER = "server"  # reply after Redis applied the write (its own persistence settings)
    FSYNC = "fsync"  # WAITAOF 1 0: the primary fsynced its AOF
    REPLICATED = "replicated"  # WAIT: the replicas acknowledged (Sentinel: all promotable)


def _as_list(value: Any) -> Any:
    """A single value where a list is expected (`region: eu`) is a list of one."""
    return [value] if isinstance(value, str) else value


class RetryOverrides(_Section):
    """A traffic class's own retry schedule and lifetime: each key given replaces `retry.*`."""

    initial_s: Seconds | None = None
    max_s: Seconds | None = None
    multiplier: Annotated[float, Field(ge=1)] | None = None
    jitter: Annotated[float, Field(ge=0, le=1)] | None = None
    lifetime_s: Seconds | None = None


class TrafficClassConfig(_Section):
    """A traffic class: streams of its own in every shard, its own retry schedule and
    lifetime. Mail from these sender domains or tenants falls in it (message-wide conditions:
    a class is one queue entry's, not one recipient's)."""

    name: str = Field(pattern=r"^[a-z0-9_-]{1,32}$")
    sender_domains: list[str] = Field(default_factory=list)
    tenants: list[str] = Field(default_factory=list)
    retry: RetryOverrides = RetryOverrides()

    _one_or_many = field_validator("sender_domains", "tenants", mode="before")(_as_list)

    @field_validator("sender_domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        return [domain_pattern(d) for d in value]


class QueueConfig(_Section):
    durability: Durability = Durability.SERVER
    replicas: PositiveInt = 1
    durability_timeout_ms: PositiveInt = 2000
    high_water: PositiveInt = 1_000_000
    dedupe_window_s: Annotated[float, Field(ge=0, le=MAX_DURATION_S)] = 3600.0
    # Traffic classes, highest priority first ([]: one class, the keys of before).
    classes: list[TrafficClassConfig] = Field(default_factory=list)
    # The class of mail no class's conditions and no trusted header place ("": the first).
    # Its streams keep the unsuffixed keys, so adding classes leaves queued mail where it is.
    default_class: str = ""
    # A class asked for by this header, trusted from relay_networks and authenticated
    # clients only ("": no header), like routing.tenant_header.
    class_header: str = Field(default="", pattern=r"^[!-9;-~]*$")
    # Each class below the first may fill this share of a node's delivery slots even while a
    # higher class has mail waiting, so it is never starved.
    class_share: Annotated[float, Field(ge=0, le=0.5)] = 0.1

    @model_validator(mode="after")
    def _classes_known(self) -> QueueConfig:
        names = [c.name for c in self.classes]
        duplicates = _repeated(names)
        if duplicates:
            raise ValueError(f"class names must be unique: {', '.join(duplicates)}")
        if self.default_class and self.default_class not in names:
            raise ValueError(f"default_class {self.default_class!r} is not one of classes")
        return self


class DeliveryConfig(_Section):
    concurrency: PositiveInt = 64
    batch: PositiveInt = 64
    helo_name: str = ""
    connect_timeout_s: Seconds = 10.0
    command_timeout_s: Seconds = 60.0
    max_messages_per_connection: PositiveInt = 1000
    # The safety net that claims entries idle this long from any consumer (dead or stuck).
    # It must exceed the longest delivery attempt, or it steals live work (DESIGN.md).
    claim_idle_s: Seconds = 900.0
    block_ms: PositiveInt = 1000

    @field_validator("helo_name")
    @classmethod
    def _helo_name(cls, value: str) -> str:
        return smtp_domain(value) if value else value

    @model_validator(mode="after")
    def _claim_after_attempt(self) -> DeliveryConfig:
        longest_attempt_s = self.connect_timeout_s + 4 * self.command_timeout_s
        if self.claim_idle_s <= longest_attempt_s:
            raise ValueError(
                f"claim_idle_s ({self.claim_idle_s}) must exceed the longest delivery attempt "
                f"(connect_timeout_s + 4 * command_timeout_s = {longest_attempt_s})"
            )
        return self


class RetryConfig(_Section):
    # Postfix-like defaults: first retry minutes later, capped near an hour, 5 days lifetime.
    initial_s: Seconds = 300.0
    max_s: Seconds = 3600.0
    multiplier: Annotated[float, Field(ge=1)] = 2.0
    jitter: Annotated[float, Field(ge=0, le=1)] = 0.2
    lifetime_s: Seconds = 5 * 24 * 3600.0
    scheduler_interval_s: Seconds = 1.0


class RoutingKey(StrEnum):
    RECIPIENT_DOMAIN = "recipient_domain"  # the first recipient's domain
    SENDER_DOMAIN = "sender_domain"
    MESSAGE_ID = "message_id"  # the queue id: spreads one domain's mail over every relay


class RelaySelector(_Section):
    """Which relays a routing rule allows, by label. Every key given must hold: a relay's
    label is one of the values listed; `tags`: the relay has every tag listed."""

    names: list[str] = Field(default_factory=list)
    region: list[str] = Field(default_factory=list)
    provider: list[str] = Field(default_factory=list)
    zone: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)

    _one_or_many = field_validator("names", "region", "provider", "zone", "tags", mode="before")(
        _as_list
    )

    @model_validator(mode="after")
    def _not_empty(self) -> RelaySelector:
        if not (self.names or self.region or self.provider or self.zone or self.tags):
            raise ValueError("a selector names at least one of names, region, provider, zone, tags")
        return self

    def selects(self, relay: RelayConfig) -> bool:
        labels = (
            (self.names, relay.name),
            (self.region, relay.region),
            (self.provider, relay.provider),
            (self.zone, relay.zone),
        )
        return all(not wanted or have in wanted for wanted, have in labels) and set(
            self.tags
        ) <= set(relay.tags)


class RoutingRule(_Section):
    """Mail this rule matches may leave only through the relays its selector names, failover
    included. Every condition given must hold (a value list: any of them); a rule without
    conditions matches all mail. Domains: exact, or `*.example.com` for its subdomains."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    sender_domains: list[str] = Field(default_factory=list)
    recipient_domains: list[str] = Field(default_factory=list)
    tenants: list[str] = Field(default_factory=list)
    relays: RelaySelector

    _one_or_many = field_validator("sender_domains", "recipient_domains", "tenants", mode="before")(
        _as_list
    )

    @field_validator("sender_domains", "recipient_domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        return [domain_pattern(d) for d in value]


class RoutingConfig(_Section):
    key: RoutingKey = RoutingKey.RECIPIENT_DOMAIN
    # Consistent hashing with bounded load: a relay already carrying more than load_factor
    # times its fair share of this node's deliveries passes the key to the next relay.
    load_factor: Annotated[float, Field(ge=1.0)] = 1.25
    # Share of keys (percent) sent to the standby tier first, so it stays warm.
    warm_percent: Annotated[float, Field(ge=0, le=100)] = 0.0
    # The tenant of a message, for rules' `tenants`: the authenticated user (SMTP AUTH), else
    # this header's value on mail from relay_networks clients ("": the user only). Mail from
    # anyone else has no tenant: a stranger cannot pick a route by writing the header.
    tenant_header: str = Field(default="", pattern=r"^[!-9;-~]*$")
    # Ordered, first match wins, per recipient; mail no rule matches may use every relay.
    rules: list[RoutingRule] = Field(default_factory=list)

    @field_validator("rules")
    @classmethod
    def _unique_rule_names(cls, value: list[RoutingRule]) -> list[RoutingRule]:
        names = [rule.name for rule in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"rule names must be unique: {', '.join(duplicates)}")
        return value


class HealthConfig(_Section):
    interval_s: Seconds = 1.0
    timeout_s: Seconds = 2.0
    fall: PositiveInt = 2  # consecutive failed checks that take a relay out
    rise: PositiveInt = 2  # consecutive good checks that bring it back
    # Passive checks: consecutive connection errors, timeouts or 421s on real deliveries.
    passive_failures: PositiveInt = 3
    ejection_s: Seconds = 10.0  # first ejection; doubles on each repeat
    max_ejection_s: Seconds = 300.0
    max_ejection_percent: Annotated[float, Field(ge=0, le=100)] = 50.0


class ClusterConfig(_Section):
    heartbeat_interval_s: Seconds = 1.0
    # A node whose heartbeat is older than this is dead: survivors take over its deliveries.
    # A node that cannot reach Redis for this long stops starting deliveries (self-fencing).
    lease_s: Seconds = 5.0
    # Refresh the idle time of in-flight entries this often so no claim can take live work.
    lease_refresh_s: Seconds = 5.0

    @model_validator(mode="after")
    def _lease_after_heartbeat(self) -> ClusterConfig:
        if self.lease_s < 2 * self.heartbeat_interval_s:
            raise ValueError("lease_s must be at least twice heartbeat_interval_s")
        return self


class TlsPolicy(StrEnum):
    NONE = "none"
    OPPORTUNISTIC = "opportunistic"
    REQUIRED = "required"


class RelayConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    host: str
    port: Port = 25
    priority: Annotated[int, Field(ge=0, le=MAX_COUNT)] = 10
    weight: PositiveInt = 1
    tls: TlsPolicy = TlsPolicy.NONE
    tls_verify: bool = True
    # The CA bundle (PEM) the relay's certificate is verified against, for delivery and the
    # health check alike; "": the system CAs.
    tls_ca_file: str = ""
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    max_connections: PositiveInt = 16  # cluster-wide, shared through Redis
    # Cluster-wide, in whole messages: the budget is counted per second. 0: unlimited.
    max_messages_per_s: NonNegativeInt = 0
    # Addresses this relay sends from: `check-dns` verifies SPF authorizes each of them.
    egress_addresses: list[str] = Field(default_factory=list)
    # Labels: what routing rules select relays by (`routing.rules[].relays`). "" / []: none.
    region: str = ""
    provider: str = ""
    zone: str = ""
    tags: list[str] = Field(default_factory=list)

    _host = field_validator("host")(relay_host)

    @field_validator("egress_addresses")
    @classmethod
    def _ips(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_address(item)
        return value

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


UNIX_PREFIX = "unix:"


class HttpConfig(_Section):
    # /metrics, /healthz, /readyz on HOST:PORT, or unix:/PATH (how `serve --workers` reaches
    # each worker). Empty: no HTTP listener.
    listen: str = "127.0.0.1:9125"

    @field_validator("listen")
    @classmethod
    def _address(cls, value: str) -> str:
        if value.startswith(UNIX_PREFIX):
            if not value[len(UNIX_PREFIX) :].startswith("/"):
                raise ValueError(f"{value!r}: expected unix:/ABSOLUTE/PATH")
        elif value:
            parse_hostport(value)
        return value

    @property
    def unix_path(self) -> str | None:
        return self.listen[len(UNIX_PREFIX) :] if self.listen.startswith(UNIX_PREFIX) else None


class DkimKey(_Section):
    selector: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    public_key: str = ""  # base64 as published in p=; empty: only check it is published


class DnsConfig(_Section):
    """What `smtpfleet check-dns` expects the sending domain's DNS to say."""

    dkim: list[DkimKey] = Field(default_factory=list)
    active_active: bool = True  # expect two or more MX records of equal priority
    max_ttl_s: PositiveInt = 300  # longer TTLs slow down failover


class Canonicalization(StrEnum):
    """header/body canonicalization (RFC 6376 §3.4); relaxed survives re-folding in transit."""

    RELAXED_RELAXED = "relaxed/relaxed"
    RELAXED_SIMPLE = "relaxed/simple"
    SIMPLE_RELAXED = "simple/relaxed"
    SIMPLE_SIMPLE = "simple/simple"


class SigningFailure(StrEnum):
    """What the client is told when a message of a signing domain cannot be signed."""

    ACCEPT = "accept"  # queue it unsigned (logged, counted): the mail goes out
    TEMPFAIL = "tempfail"  # 451 4.3.0: the client keeps it and retries


# RFC 6376 §5.4.1: trace and per-recipient fields change in transit and are never signed.
UNSIGNABLE_HEADERS = frozenset(
    {"return-path", "received", "comments", "keywords", "bcc", "resent-bcc", "dkim-signature"}
)


class DkimSigningKey(_Section):
    """One signing domain: mail whose From: header is in `domain` is signed with this key."""

    domain: str
    selector: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    # The RSA private key (PEM, PKCS#1 or PKCS#8, unencrypted; a mounted secret).
    key_file: str
    # Header fields to sign, From first; []: the fields of RFC 6376 §5.4.1 that the message
    # has, From signed twice so none can be added.
    headers: list[str] = Field(default_factory=list)
    canonicalization: Canonicalization = Canonicalization.RELAXED_RELAXED

    @field_validator("domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        return domain_name(value)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: list[str]) -> list[str]:
        names = [name.strip().lower() for name in value]
        if names and "from" not in names:
            raise ValueError("must include From (RFC 6376 §5.4)")
        unsignable = sorted(set(names) & UNSIGNABLE_HEADERS)
        if unsignable:
            raise ValueError(f"must not sign {', '.join(unsignable)} (RFC 6376 §5.4.1)")
        return names


class DkimConfig(_Section):
    """DKIM signing at accept time, before the message is queued (docs/security.md)."""

    keys: list[DkimSigningKey] = Field(default_factory=list)
    # How often the key files are checked for a change (a rotated secret is used at once).
    reload_interval_s: Seconds = 10.0
    on_failure: SigningFailure = SigningFailure.ACCEPT

    @field_validator("keys")
    @classmethod
    def _one_key_per_domain(cls, value: list[DkimSigningKey]) -> list[DkimSigningKey]:
        duplicates = _repeated(key.domain for key in value)
        if duplicates:
            raise ValueError(f"one key per domain: {', '.join(duplicates)} repeated")
        return value


def _repeated(names: Iterable[str]) -> list[str]:
    """The names that occur more than once, sorted."""
    counts = collections.Counter(names)
    return sorted(name for name, n in counts.items() if n > 1)


class BounceConfig(_Section):
    # The display sender of DSNs; the envelope sender is always null (RFC 3464, RFC 5321 4.5.5).
    from_address: str = ""

    @field_validator("from_address")
    @classmethod
    def _from_address(cls, value: str) -> str:
        # It becomes the From: header of every DSN: a CR LF here would add header fields.
        return mailbox(value) if value else value


class Config(_Section):
    node: NodeConfig = NodeConfig()
    inbound: InboundConfig = InboundConfig()
    redis: RedisConfig = RedisConfig()
    queue: QueueConfig = QueueConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    retry: RetryConfig = RetryConfig()
    relays: list[RelayConfig] = Field(default_factory=list)
    routing: RoutingConfig = RoutingConfig()
    health: HealthConfig = HealthConfig()
    cluster: ClusterConfig = ClusterConfig()
    bounce: BounceConfig = BounceConfig()
    http: HttpConfig = HttpConfig()
    dns: DnsConfig = DnsConfig()
    dkim: DkimConfig = DkimConfig()

    @field_validator("relays")
    @classmethod
    def _unique_relay_names(cls, value: list[RelayConfig]) -> list[RelayConfig]:
        duplicates = _repeated(relay.name for relay in value)
        if duplicates:
            raise ValueError(f"relay names must be unique: {', '.join(duplicates)}")
        return value

    @model_validator(mode="after")
    def _rules_select_relays(self) -> Config:
        """A rule whose selector matches no relay would hold its mail forever: refuse it."""
        empty = [
            rule.name
            for rule in self.routing.rules
            if not any(rule.relays.selects(relay) for relay in self.relays)
        ]
        if empty:
            raise ValueError(f"routing.rules {', '.join(empty)}: the selector matches no relay")
        return self


def _problem(error: ErrorDetails, overlay: Overlay) -> str:
    """One validation error as `key: message`, led by the variable that set the key when it
    came from the environment (the file does not have it: looking there would not help)."""
    loc = tuple(str(part) for part in error["loc"])
    key = ".".join(loc) or "(top level)"
    variable = overlay.source_of(loc)
    if variable is not None:
        return f"{variable} ({key}): {error['msg']}"
    inside = overlay.sources_under(loc) if loc else []
    if inside:  # a section's own rule, over keys some of which the environment set
        return f"{key}: {error['msg']} (with {', '.join(inside)} from the environment)"
    return f"{key}: {error['msg']}"


def _report(problems: list[str]) -> ConfigError:
    """One problem on one line; several (all at once) as a list under the heading."""
    if len(problems) == 1:
        return ConfigError(f"invalid configuration: {problems[0]}")
    return ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def build_config(tree: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed document (plus environment overrides) into a frozen Config."""
    overlay = overlay_environment(
        copy.deepcopy(dict(tree)),  # the caller's tree stays as it was
        environ or {},
        Config,
        prefix=ENV_PREFIX,
        separator=ENV_SEPARATOR,
        reserved=RESERVED_ENV,
    )
    problems = list(overlay.problems)
    try:
        config = Config.model_validate(overlay.tree)
    except ValidationError as exc:
        problems += [_problem(error, overlay) for error in exc.errors()]
    if problems:
        raise _report(problems)
    return config


def load_config(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the YAML file (optional: None or "" is none) and the environment, and validate
    both together. An empty path is "no file", as an empty SMTPFLEET_CONFIG is unset: read
    as a path it was the current directory ("cannot read config file : Is a directory")."""
    environ = os.environ if environ is None else environ
    tree: Any = {}
    if path is not None and str(path) != "":
        tree = _read_document(path)
    return build_config(tree, environ)


def _read_document(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"cannot read config file {path}: not UTF-8 text (byte {exc.start})"
        ) from None
    try:
        tree = parse_yaml(text) or {}
    except YamlProblem as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return tree
