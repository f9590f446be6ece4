"""The context-manager shape every launcher of test servers shares."""

from __future__ import annotations

from typing import Self


class Launched:
    """`with X(...) as x:` starts x and closes it; a start that fails closes what it got to
    (processes, directories), so a failed launch leaves nothing behind."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
