"""The per-message log lines: written straight to the node's JSON handler, the same line the
logging path writes; any other set-up gets them through logging as before."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from smtpfleet.logs import JsonFormatter, TickHandler, info_event

pytestmark = pytest.mark.timeout(30)

NAME = "smtpfleet.test.events"


@pytest.fixture
def node_logging() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """The node's set-up (configure_logging) on a logger of its own: one JSON TickHandler."""
    stream = io.StringIO()
    handler = TickHandler(stream)
    handler.setFormatter(JsonFormatter())
    parent = logging.getLogger(NAME)
    parent.addHandler(handler)
    parent.propagate = False
    parent.setLevel(logging.INFO)
    try:
        yield logging.getLogger(f"{NAME}.child"), stream
    finally:
        parent.removeHandler(handler)
        parent.propagate = True


def _without_ts(line: str) -> str:
    head, _, rest = line.partition('","level"')
    assert head.startswith('{"ts":"')
    return rest


FIELDS = st.dictionaries(
    st.text(st.characters(codec="utf-8"), max_size=8).filter(
        lambda key: (
            not key.startswith("_")
            and key not in {"message", "asctime"}
            and key not in vars(logging.LogRecord("", 0, "", 0, "", (), None))
        )
    ),
    st.one_of(st.none(), st.integers(), st.text(max_size=20), st.lists(st.integers(), max_size=3)),
    max_size=6,
)


@given(msg=st.text(max_size=30).filter(lambda m: "%" not in m), fields=FIELDS)
@example(msg="", fields={"ts": None, "level": "error", "logger": 1})
def test_an_event_line_is_the_line_logging_writes(msg: str, fields: dict[str, object]) -> None:
    logger = logging.getLogger(f"{NAME}.prop")
    stream = io.StringIO()
    handler = TickHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        info_event(logger, msg, fields)  # no running loop: written at once
        logger.info(msg, extra=fields)
    finally:
        logger.removeHandler(handler)
    fast, slow = stream.getvalue().splitlines()
    assert _without_ts(fast) == _without_ts(slow)
    line = json.loads(fast)
    assert (line["msg"], line["level"], line["logger"]) == (msg, "info", f"{NAME}.prop")


async def test_an_event_for_the_json_handler_makes_no_log_record(
    node_logging: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = node_logging
    made: list[logging.LogRecord] = []
    factory = logging.getLogRecordFactory()

    def counting(*args: object, **kwargs: object) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        made.append(record)
        return record

    logging.setLogRecordFactory(counting)
    try:
        info_event(logger, "smtp transaction", {"event": "smtp.transaction", "code": 250})
        await asyncio.sleep(0)  # the end of the loop turn writes the buffered lines
    finally:
        logging.setLogRecordFactory(factory)
    assert made == []
    entry = json.loads(stream.getvalue())
    assert (entry["event"], entry["code"], entry["level"]) == ("smtp.transaction", 250, "info")
    assert entry["logger"] == logger.name


async def test_any_other_set_up_gets_the_event_through_logging(
    node_logging: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = node_logging
    extra = logging.StreamHandler(io.StringIO())
    logger.addHandler(extra)  # a second handler: the record must reach both
    try:
        info_event(logger, "delivery attempt", {"event": "delivery.attempt", "qid": "q1"})
        await asyncio.sleep(0)
    finally:
        logger.removeHandler(extra)
    assert "delivery attempt" in extra.stream.getvalue()  # type: ignore[attr-defined]
    assert json.loads(stream.getvalue())["qid"] == "q1"


async def test_a_filter_or_a_higher_level_is_respected(
    node_logging: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = node_logging
    drop = logging.Filter("nothing.matches")
    logger.addFilter(drop)
    try:
        info_event(logger, "filtered", {"event": "x"})
    finally:
        logger.removeFilter(drop)
    logger.setLevel(logging.WARNING)
    try:
        info_event(logger, "below the level", {"event": "x"})
    finally:
        logger.setLevel(logging.NOTSET)
    await asyncio.sleep(0)
    assert stream.getvalue() == ""
