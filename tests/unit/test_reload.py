"""Files read again when they change: at most every interval, the last good value kept."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from smtpfleet.inbound.reload import Reloading


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _loader(path: Path) -> Reloading[int]:
    def load() -> int:
        return int(path.read_text())

    return Reloading((str(path),), load, interval_s=5.0, what="test file", clock=CLOCK)


CLOCK = Clock()


def test_reloads_a_changed_file_only_after_the_interval(tmp_path: Path) -> None:
    path = tmp_path / "value"
    path.write_text("1")
    value = _loader(path)
    replacement = tmp_path / "new"
    replacement.write_text("22")
    os.replace(replacement, path)  # how a Kubernetes secret changes: a new file
    assert value.get() == 1  # not checked again yet
    CLOCK.now += 5
    assert value.get() == 22
    assert value.reloads == 1


def test_a_broken_change_keeps_the_last_good_value(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "value"
    path.write_text("1")
    value = _loader(path)
    path.write_text("not a number, longer")
    CLOCK.now += 5
    with caplog.at_level(logging.ERROR):
        assert value.get() == 1
    assert "cannot be loaded" in caplog.text
    path.write_text("3")
    CLOCK.now += 5
    assert value.get() == 3


def test_a_missing_file_keeps_the_value_and_is_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "value"
    path.write_text("1")
    value = _loader(path)
    path.unlink()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):  # it was said at every check, every interval
            CLOCK.now += 5
            assert value.get() == 1
        assert caplog.text.count("cannot read") == 1
        path.write_text("4")  # back: read again, and said again should it go once more
        CLOCK.now += 5
        assert value.get() == 4
        path.unlink()
        CLOCK.now += 5
        assert value.get() == 4
    assert caplog.text.count("cannot read") == 2


def test_a_broken_file_at_start_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "value"
    path.write_text("x")
    with pytest.raises(ValueError, match="invalid literal"):
        _loader(path)
