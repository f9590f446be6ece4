"""Exceptions that cross module boundaries."""

from __future__ import annotations


class SmtpfleetError(Exception):
    """Base class of smtpfleet's own errors."""


class ConfigError(SmtpfleetError):
    """The configuration is invalid; the message names every offending key."""


class SpoolError(SmtpfleetError):
    """The queue could not take a message durably; the client must retry (4xx)."""


class QueueUnavailable(SpoolError, ConnectionError):
    """Redis is unreachable, too slow, or did not confirm durability in time."""


class RedisFull(QueueUnavailable):
    """Redis refuses writes: it is at its `maxmemory` (with `noeviction`, as it must be).
    Reachable, and not coming back by waiting: memory must be freed or the limit raised."""


class Fenced(SmtpfleetError):
    """This node has not reached Redis for nearly a lease: it starts no delivery step, so
    nothing it does can race the survivor that will claim its work (DESIGN invariant 4)."""


class LimitsUnavailable(SmtpfleetError, ConnectionError):
    """The cluster-wide relay limits cannot be read; the per-node caps still hold."""


class QueueFull(SpoolError):
    """The queue is above its high-water mark."""


class RedisUnsuitable(SmtpfleetError):
    """The Redis server cannot hold mail safely (too old, or may evict keys)."""


class RedisAccessDenied(RedisUnsuitable):
    """Redis refused our credentials or ACL, or its TLS certificate is not trusted: waiting
    for it cannot help, so a node stops at start instead of retrying."""


class SigningFailed(SmtpfleetError):
    """A message of a signing domain could not be DKIM-signed, and the config says 451."""
