"""The operator commands of the CLI: they read and change cluster state in Redis.

Each command finds the cluster by `--redis URL`, or `--config FILE` / $SMTPFLEET_CONFIG (with
the usual SMTPFLEET_* overrides). Output is a table for people, `--json` for scripts. Errors
are one line and an exit code: 1 when Redis or the cluster says no, 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.exceptions import RedisError

from smtpfleet.cli.parser import STATES
from smtpfleet.config import Config, load_config
from smtpfleet.envelope import EntryState
from smtpfleet.errors import ConfigError, QueueUnavailable
from smtpfleet.queue.redis_admin import Admin, NotFound
from smtpfleet.queue.redis_queue import RedisQueue
from smtpfleet.queue.topology import compact_ranges

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + 2  # SIGINT, as a shell reports it


class OpsError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def _config(args: argparse.Namespace) -> Config:
    # --redis as its variable would give it: validated with the rest, over the file.
    # An empty one (`--redis "$UNSET"`) is refused there, never taken for the default URL.
    environ = {**os.environ, "SMTPFLEET_REDIS__URL": args.redis} if args.redis is not None else None
    return load_config(args.config, environ)


def run(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
    except ConfigError as exc:
        print(f"smtpfleet: {exc}", file=sys.stderr)
        return EXIT_USAGE
    command = COMMANDS[(args.command, getattr(args, "action", None))]
    try:
        return asyncio.run(_with_admin(config, lambda admin: command(admin, args, config)))
    except OpsError as exc:
        print(f"smtpfleet: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("smtpfleet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


async def _with_admin(config: Config, body: Callable[[Admin], Awaitable[int]]) -> int:
    queue = await _open_queue(config)
    url = _url(config)
    try:
        admin = Admin(queue)
        try:
            return await body(admin)
        except NotFound as exc:
            raise OpsError(str(exc), EXIT_FAILED) from None
        except BrokenPipeError:
            raise  # our reader went away (`| head`), not Redis: main() stops quietly
        except Exception as exc:
            error = _redis_error(exc, url, admin)
            if error is None:
                raise
            raise error from None
    finally:
        await queue.close()


async def _open_queue(config: Config) -> RedisQueue:
    """The queue, reached, on the cluster's own shard count (see `_cluster_shards`)."""
    queue = RedisQueue(config.redis, config.queue)
    url = _url(config)
    try:
        try:
            await queue.client.ping()
        except Exception as exc:
            raise OpsError(
                f"cannot reach Redis at {url}: {exc.__class__.__name__}: {exc}"
            ) from None
        admin = Admin(queue)
        try:
            shards = await _cluster_shards(admin, config)
        except OpsError:
            raise
        except Exception as exc:
            error = _redis_error(exc, url, admin)
            if error is None:
                raise
            raise error from None
    except BaseException:
        await queue.close()
        raise
    if shards == config.redis.shards:
        return queue
    await queue.close()
    return RedisQueue(config.redis.model_copy(update={"shards": shards}), config.queue)


async def _cluster_shards(admin: Admin, config: Config) -> int:
    """The number of shards to act on. With no `redis.shards` given (`--redis` alone), the
    cluster's, learned from Redis: the default 16 read a 64-shard cluster's first quarter,
    and `dead purge --all` purged a quarter. Given, and the cluster has more: refused, as a
    sign of the wrong configuration file."""
    found = await admin.shards_in_redis()
    configured = config.redis.shards
    if found == configured or "shards" not in config.redis.model_fields_set:
        return found
    raise OpsError(
        f"the cluster under prefix {config.redis.prefix!r} has {found} shards, not"
        f" redis.shards={configured}: pass the cluster's config (--config) or set"
        f" SMTPFLEET_REDIS__SHARDS={found}"
    )


def _url(config: Config) -> str:
    return config.redis.url.rsplit("@", 1)[-1]  # never the password


def _redis_error(exc: Exception, url: str, admin: Admin) -> OpsError | None:
    """What the operator reads when Redis fails a command after it answered PING: Redis's
    refusal, or that it went away; None if it is neither (a bug: its traceback)."""
    refusal = admin.refusal(exc)
    if refusal is not None:
        return OpsError(str(refusal), EXIT_FAILED)
    if isinstance(exc, QueueUnavailable):  # the queue's own calls say "redis: ..." already
        return OpsError(f"Redis at {url} went away: {exc}")
    # redis-py's errors are RedisError, not the built-in ConnectionError or TimeoutError.
    if isinstance(exc, ConnectionError | TimeoutError | OSError | RedisError):
        return OpsError(f"Redis at {url} went away: redis: {exc.__class__.__name__}: {exc}")
    return None


def _emit(args: argparse.Namespace, data: Any, table: Callable[[], str]) -> int:
    print(json.dumps(data, indent=None, default=str) if args.json else table())
    return EXIT_OK


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [
        ["" if c is None else str(c) for c in row] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


# -- commands -------------------------------------------------------------------------------


async def _status(admin: Admin, args: argparse.Namespace, config: Config) -> int:
    data = await admin.status(config.cluster.lease_s, [r.name for r in config.relays])
    data["redis"] = (await admin.topology(config.redis.master_name)).as_dict()
    return _emit(args, data, lambda: f"{_status_table(data)}\n\n{redis_table(data['redis'])}")


def _status_table(data: dict[str, Any]) -> str:
    nodes = format_table(
        ["NODE", "ALIVE", "ROLE", "HEARTBEAT", "UPTIME", "HOST", "IN FLIGHT", "CONFIG"],
        [
            [
                n["id"],
                "yes" if n["alive"] else "NO",
                n["role"],
                f"{n['heartbeat_age_s']}s ago",
                f"{n['uptime_s']}s" if n["uptime_s"] is not None else "",
                n["host"],
                data["queue"]["in_flight_by_node"].get(n["id"], 0),
                n.get("config") or "",
            ]
            for n in data["nodes"]
        ],
    )
    relays = format_table(
        ["RELAY", "VERDICT", "VIEWS", "LAST 5 MIN", "WHY DOWN"],
        [
            [
                r["name"],
                r["verdict"].upper() if r["verdict"] != "up" else "up",
                " ".join(f"{n}={v}" for n, v in sorted(r["views"].items())),
                " ".join(f"{k}={v}" for k, v in sorted(r["recent"].items())),
                "; ".join(sorted(set(r["reasons"].values()))),
            ]
            for r in data["relays"]
        ],
    )
    q = data["queue"]
    queue = (
        f"queue: {q['ready']:.0f} ready, {q['in_flight']:.0f} in flight, "
        f"{q['retry']:.0f} retrying, {q['dead']:.0f} dead letters; "
        f"oldest {q['oldest_age_s']:.0f}s"
    )
    waiting = _waiting_line(data.get("waiting_for_route", {}))
    classes = _class_lines(q.get("classes", {}))
    return f"{nodes}\n\n{relays}\n\n{queue}{classes}{waiting}{_drift_lines(data['config'])}"


def _class_lines(classes: dict[str, dict[str, float]]) -> str:
    """The backlog of each traffic class, highest priority first (queue/classes.py)."""
    return "".join(
        f"\n  class {name}: {c['ready']:.0f} ready, {c['in_flight']:.0f} in flight, "
        f"{c['retry']:.0f} retrying; oldest {c['oldest_age_s']:.0f}s"
        for name, c in classes.items()
    )


def _drift_lines(drift: dict[str, Any]) -> str:
    """Which live nodes route with another configuration than most, and what differs."""
    if not drift["drift"]:
        return ""
    lines = [f"config drift: {drift['distinct']} distinct routing configurations"]
    lines += [
        f"config drift: {node} differs: {', '.join(what)}"
        for node, what in drift["differing"].items()
    ]
    return "\n" + "\n".join(lines)


def redis_table(redis: dict[str, Any]) -> str:
    """The Redis servers: one row per primary and replica, which shards each primary holds (on
    a Cluster), then the Sentinels' answers."""
    rows: list[list[Any]] = []
    for p in redis["primaries"]:
        role = p["role"].upper() if p["role"] != "primary" else p["role"]
        problem = f"NOT ANSWERING: {p['error']}" if p["error"] else ""
        rows.append([p["address"], role, p["version"], len(p["shards"]), problem, ""])
        rows += [
            [f"  {r['address']}", "replica", "", "", _link(r["link"]), _lag(r)]
            for r in p["replicas"]
        ]
    table = format_table(["REDIS", "ROLE", "VERSION", "SHARDS", "LINK", "LAG"], rows)
    lines = [f"redis: {redis['mode']}", table]
    if redis["mode"] == "cluster":
        lines += [
            f"shards on {p['address']}: {compact_ranges(p['shards'])}" for p in redis["primaries"]
        ]
    if redis["unassigned_shards"]:
        lines.append(f"SHARDS NOT SERVED: {compact_ranges(redis['unassigned_shards'])}")
    if redis["sentinels"]:
        lines.append(_sentinels_line(redis["sentinels"]))
    if redis.get("replicas_to_confirm") is not None:
        lines.append(
            f"replicated accepts wait for {redis['replicas_to_confirm']} replicas "
            "(every replica in sync a failover could promote; queue.replicas at least)"
        )
    return "\n".join(lines)


def _sentinels_line(sentinels: list[dict[str, Any]]) -> str:
    answered = [s for s in sentinels if not s["error"]]
    return f"sentinels: {len(answered)} of {len(sentinels)} answered" + "".join(
        f"; {s['address']} " + (f"says {s['primary']}" if not s["error"] else "NO ANSWER")
        for s in sentinels
    )


def _link(link: str) -> str:
    return link if link == "up" else link.upper()


def _lag(replica: dict[str, Any]) -> str:
    if replica["lag_bytes"] is None:
        return ""
    return f"{replica['lag_bytes']} B, ack {replica['last_ack_s']}s ago"


def _waiting_line(waiting: dict[str, int]) -> str:
    """Why mail waits while relays are up: none of its routing rule's relays is healthy."""
    if not waiting:
        return ""
    rules = ", ".join(f"{rule} {count}" for rule, count in waiting.items())
    return f"\nwaiting for a healthy relay of their routing rule (last 5 min, recipients): {rules}"


async def _queue_list(admin: Admin, args: argparse.Namespace, config: Config) -> int:
    entries = await admin.entries(args.state or STATES, args.limit)
    rows = [
        [
            e.qid,
            e.state,
            e.sender or "<>",
            len(e.recipients),
            e.attempts,
            f"{e.age_s:.0f}s",
            e.owner or (f"in {e.due_in_s:.0f}s" if e.due_in_s is not None else ""),
        ]
        for e in entries
    ]
    table = format_table(
        ["QUEUE ID", "STATE", "SENDER", "RCPTS", "TRIES", "AGE", "OWNER/DUE"], rows
    )
    return _emit(args, [e.as_dict() for e in entries], lambda: table)


async def _queue_show(admin: Admin, args: argparse.Namespace, config: Config) -> int:
    entry, _ = await admin.find(args.qid)
    headers = await admin.headers(args.qid)
    data = {**entry.as_dict(), "headers": headers}
    lines = [f"{k}: {v}" for k, v in entry.as_dict().items()]
    return _emit(args, data, lambda: "\n".join([*lines, "", headers]))


async def _queue_retry(admin: Admin, args: argparse.Namespace, config: Config) -> int:
    result = await admin.retry_now(args.qid)
    return _emit(args, {"qid": args.qid, "result": result}, lambda: f"{args.qid}: {result}")


async def _queue_delete(admin: Admin, args: argparse.Namespace, config: Config) -> int:
    result = await admin.delete(args.qid)
    return _emit(args, {"qid": args.qid, "result": result}, lambda: f"{args.qid}: {result}")


async def _dead_list(admin: Admin, args: argparse.Namespace, config: Config) -> int:
    entries = await admin.entries(["dead"], args.limit)
    rows = [[e.qid, e.sender or "<>", ", ".join(e.recipients), e.reason] for e in entries]
    table = format_table(["QUEUE ID", "SENDER", "RECIPIENTS", "REASON"], rows)
    return _emit(args, [e.as_dict() for e in entries], lambda: table)


async def _dead_requeue(admin: Admin, args: argparse.Namespace, config: Config) -> int:
    if args.all:
        count = await admin.requeue_all_dead()
        return _emit(args, {"requeued": count}, lambda: f"requeued {count} dead letters")
    entry, _ = await admin.find(args.qid)
    if entry.state is not EntryState.DEAD:
        raise OpsError(f"{args.qid} is not a dead letter (it is {entry.state})")
    result = await admin.retry_now(args.qid)
    return _emit(args, {"qid": args.qid, "result": result}, lambda: f"{args.qid}: {result}")


async def _dead_purge(admin: Admin, args: argparse.Namespace, config: Config) -> int:
    if args.all:
        count = await admin.purge_dead()
        return _emit(args, {"purged": count}, lambda: f"purged {count} dead letters")
    entry, _ = await admin.find(args.qid)
    if entry.state is not EntryState.DEAD:
        raise OpsError(f"{args.qid} is not a dead letter (it is {entry.state})")
    result = await admin.delete(args.qid)
    return _emit(args, {"qid": args.qid, "result": result}, lambda: f"{args.qid}: {result}")


def _relay_switch(paused: bool) -> Callable[[Admin, argparse.Namespace, Config], Awaitable[int]]:
    async def switch(admin: Admin, args: argparse.Namespace, config: Config) -> int:
        await admin.set_paused(args.name, paused, [r.name for r in config.relays])
        word = "paused" if paused else "resumed"
        return _emit(args, {"relay": args.name, "state": word}, lambda: f"relay {args.name} {word}")

    return switch


async def _node_drain(admin: Admin, args: argparse.Namespace, config: Config) -> int:
    nodes = await admin.request_drain(args.id)
    text = (
        f"asked {', '.join(nodes)} to drain; each stops accepting and exits when its work is done"
    )
    return _emit(args, {"node": args.id, "nodes": nodes, "state": "drain requested"}, lambda: text)


Command = Callable[[Admin, argparse.Namespace, Config], Awaitable[int]]
COMMANDS: dict[tuple[str, str | None], Command] = {
    ("status", None): _status,
    ("queue", "list"): _queue_list,
    ("queue", "show"): _queue_show,
    ("queue", "retry"): _queue_retry,
    ("queue", "delete"): _queue_delete,
    ("dead", "list"): _dead_list,
    ("dead", "requeue"): _dead_requeue,
    ("dead", "purge"): _dead_purge,
    ("relay", "pause"): _relay_switch(True),
    ("relay", "resume"): _relay_switch(False),
    ("node", "drain"): _node_drain,
}
