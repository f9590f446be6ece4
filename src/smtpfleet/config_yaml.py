"""YAML read strictly, for the config file and the YAML values of SMTPFLEET_* variables.

PyYAML's SafeLoader lets a key repeat in one mapping and keeps the last silently: a second
`queue:` section dropped the first one's `durability: replicated`, a second `relays:` dropped
relays. YAML 1.2 (§3.2.1.1) says the keys of a mapping are unique, so a repeat is an error
here, naming the key and both lines. The composer recurses once per level of nesting, so
5000 `[` ran Python out of stack; nesting is capped far above anything the schema has.
Every problem is one line (where, then what), never PyYAML's block quoting
`in "<unicode string>"`.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Final

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.error import Mark
from yaml.nodes import MappingNode, Node
from yaml.reader import ReaderError

# The deepest key of the schema is 5 levels down (routing.rules[].relays.names[]); the cap
# only has to stop a document made to exhaust the stack (about 3 frames per level).
MAX_DEPTH: Final = 32
_MERGE_TAG: Final = "tag:yaml.org,2002:merge"


class YamlProblem(ValueError):
    """A text that is not acceptable YAML; the message is one line: where, then what."""


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a repeated key and nesting deeper than MAX_DEPTH."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        if self._depth >= MAX_DEPTH:
            event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in the stubs
            what = f"nested more than {MAX_DEPTH} levels deep"
            raise ComposerError(None, None, what, event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        self._refuse_repeated_keys(node)
        return super().construct_mapping(node, deep=deep)

    def _refuse_repeated_keys(self, node: MappingNode) -> None:
        # Checked before the base class flattens `<<` merges into node.value: a key given
        # here may override a merged one (that is what merge keys are for).
        first: dict[Any, Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base class reports an unhashable key itself
            earlier = first.setdefault(key, key_node)
            if earlier is not key_node:
                raise ConstructorError(
                    None,
                    None,
                    f"key {key!r} given twice in one mapping (first at "
                    f"{_at(earlier.start_mark, '')}); a YAML mapping holds each key once",
                    key_node.start_mark,
                )


def parse_yaml(text: str) -> Any:
    """The document in `text`; YamlProblem (one line) when it is not acceptable."""
    try:
        loader = StrictLoader(text)  # its reader refuses control characters right away
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise YamlProblem(describe_yaml_error(exc, text)) from None


def describe_yaml_error(exc: yaml.YAMLError, text: str) -> str:
    """`line L, column C: what` for any PyYAML error."""
    if isinstance(exc, ReaderError):  # a character YAML does not allow: only a position
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return f"{_position(text, exc.position)}: character #x{code:04x}: {exc.reason}"
    if not isinstance(exc, yaml.MarkedYAMLError):
        return _one_line(str(exc))
    what = exc.problem or exc.context or "not YAML"
    if exc.problem and exc.context:  # "while parsing a flow sequence" that started elsewhere
        what += f" ({exc.context}{_at(exc.context_mark, ' at ')})"
    mark = exc.problem_mark or exc.context_mark
    return f"{_at(mark, '')}: {what}" if mark is not None else what


def _at(mark: Mark | None, lead: str) -> str:
    return f"{lead}line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _position(text: str, index: int) -> str:
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return f"line {line}, column {column}"


def _one_line(text: str) -> str:
    return " ".join(text.split())
