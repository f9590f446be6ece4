"""SMTPFLEET_* environment variables laid over the config file, checked against the schema.

A variable names a key by its path: `SMTPFLEET_RELAYS__0__PASSWORD` is `relays[0].password`
(the key part in any case, `__` between levels, a number indexes a list). The schema says how
the value is read. A key whose type is a string (a password, a host, a file, a choice such
as `queue.durability`) takes the text exactly as given: read as YAML, `s3cret #2024` lost
its tail as a comment, `null` and `~` became None, `'x'` lost its quotes and `123456` became
a number, all silently or with an error that did not say where the value came from. Any
other key (a number, a boolean, a list, a whole section) reads the value as YAML, so
`SMTPFLEET_INBOUND__LISTEN='["0.0.0.0:25"]'` works. A variable that names no key is an
error naming it: a typo must not be ignored, nor look like a problem in the file.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Union

from pydantic import BaseModel

from smtpfleet.config_yaml import YamlProblem, parse_yaml

KeyPath = tuple[str, ...]
VariableName = Callable[[KeyPath], str]  # the variable that would set a key path


class EnvProblem(ValueError):
    """What is wrong with one variable; the caller puts the variable's name first."""


@dataclass
class Overlay:
    """The tree with the environment applied, which variable set which key, and the
    variables that could not be applied (each message names its variable)."""

    tree: dict[str, Any]
    sources: dict[KeyPath, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def source_of(self, loc: KeyPath) -> str | None:
        """The variable that set the key at `loc` or a section holding it (the innermost)."""
        found = [(len(p), name) for p, name in self.sources.items() if loc[: len(p)] == p]
        return max(found)[1] if found else None

    def sources_under(self, loc: KeyPath) -> list[str]:
        """The variables that set keys inside the section at `loc`."""
        return sorted(name for p, name in self.sources.items() if p[: len(loc)] == loc)


def overlay_environment(
    tree: dict[str, Any],
    environ: Mapping[str, str],
    schema: type[BaseModel],
    *,
    prefix: str,
    separator: str,
    reserved: frozenset[str],
) -> Overlay:
    """Apply every `prefix`-ed variable not in `reserved` to `tree` (changed in place), in
    name order, so a whole list (`SMTPFLEET_RELAYS`) comes before one of its items."""
    overlay = Overlay(tree)

    def variable(path: KeyPath) -> str:
        return prefix + separator.join(path).upper()

    for name in sorted(environ):
        if not name.startswith(prefix) or name in reserved:
            continue
        path = tuple(_segment(part) for part in name[len(prefix) :].split(separator))
        try:
            leaf = key_type(schema, path, variable)
            value = environ[name] if _is_text(leaf) else _yaml_value(environ[name])
            _place(tree, path, value, variable)
        except EnvProblem as exc:
            overlay.problems.append(f"{name}: {exc}")
            continue
        overlay.sources[path] = name
    return overlay


def _segment(text: str) -> str:
    """`RELAYS` as `relays`, `01` as `1`: as the schema and pydantic's error locations spell
    them, so an error is traced back to its variable."""
    return str(int(text)) if text.isascii() and text.isdigit() else text.lower()


def key_type(schema: type[BaseModel], path: KeyPath, variable: VariableName) -> Any:
    """The type of the key at `path` (Annotated and Optional taken off); EnvProblem when
    the schema has no such key."""
    current: Any = schema
    for depth, segment in enumerate(path):
        where = ".".join(path[:depth])
        current = _bare(current)
        if _is_model(current):
            fields = current.model_fields
            if segment not in fields:
                match = difflib.get_close_matches(segment, list(fields), n=1)
                hint = f"; did you mean {variable((*path[:depth], match[0]))}?" if match else ""
                raise EnvProblem(
                    f"not a setting ({where or 'the configuration'} has no key {segment!r}{hint})"
                )
            current = fields[segment].annotation
        elif typing.get_origin(current) is list:
            if not (segment.isascii() and segment.isdigit()):
                raise EnvProblem(
                    f"not a setting ({where} is a list: an item number comes next, 0 the first)"
                )
            current = typing.get_args(current)[0]
        else:
            raise EnvProblem(f"not a setting ({where} is a single value, it has no {segment!r})")
    return _bare(current)


def _bare(annotation: Any) -> Any:
    """`Annotated[X, ...]` and `X | None` as X."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        if origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) == 1:
                annotation = args[0]
                continue
        return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_text(annotation: Any) -> bool:
    # StrEnum choices are text too: `none` or `off` must not turn into something else.
    return isinstance(annotation, type) and issubclass(annotation, str)


def _yaml_value(text: str) -> Any:
    if not text:
        return ""  # as before: an empty value is an empty string, never None
    try:
        return parse_yaml(text)
    except YamlProblem as exc:
        raise EnvProblem(f"not valid YAML: {exc}") from None


def _place(tree: dict[str, Any], path: KeyPath, value: Any, variable: VariableName) -> None:
    """Set `value` at `path`, making missing sections; a list item must exist already."""
    node: Any = tree
    for depth in range(len(path) - 1):
        node = _descend(node, path, depth, variable)
    if isinstance(node, list):
        node[_index(node, path, len(path) - 1)] = value
    else:
        node[path[-1]] = value


def _descend(node: Any, path: KeyPath, depth: int, variable: VariableName) -> Any:
    """The list or section at path[depth] inside `node`, as the next segment needs it."""
    where = ".".join(path[: depth + 1])
    wants_list = path[depth + 1].isdigit()
    if isinstance(node, list):
        child = node[_index(node, path, depth)]
    else:
        child = node.get(path[depth])
        if child is None and wants_list:
            whole = variable(path[: depth + 1])
            raise EnvProblem(f"{where} has no items to set (give the whole list in {whole})")
        if child is None:
            child = node[path[depth]] = {}
    if not isinstance(child, list if wants_list else dict):
        kind = "a list" if wants_list else "a section"
        raise EnvProblem(f"cannot set it: {where} is {type(child).__name__}, not {kind}")
    return child


def _index(node: list[Any], path: KeyPath, depth: int) -> int:
    index = int(path[depth])  # key_type checked that it is a number
    if index >= len(node):
        where = ".".join(path[:depth])
        raise EnvProblem(f"{where} has no item {index} (it has {len(node)}; the first is 0)")
    return index
