"""Reading our own source for the qa checks (pytest puts this folder on sys.path)."""

from __future__ import annotations

import ast
import functools
import gc


@functools.cache
def parse(source: str) -> ast.Module:
    """ast.parse with the garbage collector held off: CPython 3.11 before 3.11.8 can fail with
    "AST constructor recursion depth mismatch" when a collection runs finalizers mid-parse
    (gh-106905), which a long test session full of sockets makes likely.

    Cached: the qa checks read the same few hundred files many times (a full collection per
    parse made them take over a minute). Callers only read the tree."""
    gc.disable()
    try:
        return ast.parse(source)
    finally:
        gc.enable()
