"""examples/smtpfleet.yaml is the reference users copy: it names every key of the schema, and
each value it shows is the default unless the comment on that line says "default ..." (why
the example differs). Both are derived from the pydantic models, so a new key fails here
until the example shows it."""

from __future__ import annotations

import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from smtpfleet.config import Config, load_config

EXAMPLE = Path(__file__).parents[2] / "examples" / "smtpfleet.yaml"
Path_ = tuple[str | int, ...]


def _item_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a `list[Model]` field, or None."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list and args and _is_model(args[0]):
        return typing.cast(type[BaseModel], args[0])
    return None


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def missing_keys(model: type[BaseModel], tree: Mapping[str, Any], path: str = "") -> list[str]:
    """Every key of the schema that the example tree does not name (lists: in some item)."""
    missing = []
    for name, field in model.model_fields.items():
        key = f"{path}{name}"
        if name not in tree:
            missing.append(key)
        elif _is_model(field.annotation):
            missing += missing_keys(
                typing.cast(type[BaseModel], field.annotation), tree[name], f"{key}."
            )
        elif (item := _item_model(field.annotation)) is not None:
            items = tree[name] or [{}]
            shown = {k for entry in items for k in entry}
            missing += [f"{key}[].{k}" for k in item.model_fields if k not in shown]
    return missing


def differing_values(
    model: BaseModel, tree: Mapping[str, Any], path: Path_ = ()
) -> Iterator[tuple[Path_, Any, Any]]:
    """(path, value, default) of every key the example shows with a value that is not the
    default. A list of sections (relays) is an example by nature: its items are compared."""
    for name, field in type(model).model_fields.items():
        if name not in tree:
            continue
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from differing_values(value, tree[name], (*path, name))
        elif _item_model(field.annotation) is not None:
            for i, (item, item_tree) in enumerate(zip(value, tree[name], strict=True)):
                yield from differing_values(item, item_tree, (*path, name, i))
        elif not field.is_required() and value != field.get_default(call_default_factory=True):
            yield (*path, name), value, field.get_default(call_default_factory=True)


def key_lines(node: yaml.Node, path: Path_ = ()) -> Iterator[tuple[Path_, int]]:
    """(path, line number) of every key in a composed YAML document."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield (*path, key.value), key.start_mark.line
            yield from key_lines(value, (*path, key.value))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from key_lines(item, (*path, i))


def unexplained_differences(text: str) -> list[str]:
    """Values that are not the default, on a line whose comment does not say so."""
    config = Config.model_validate(yaml.safe_load(text))
    lines = text.splitlines()
    where = dict(key_lines(yaml.compose(text)))
    found = []
    for path, value, default in differing_values(config, yaml.safe_load(text)):
        comment = lines[where[path]].partition(" #")[2]
        if "default" not in comment:
            dotted = ".".join(str(p) for p in path)
            found.append(f"{dotted}: shows {value!r}, default {default!r}, no comment says why")
    return found


def test_the_example_names_every_key_of_the_schema() -> None:
    tree = yaml.safe_load(EXAMPLE.read_text())
    assert missing_keys(Config, tree) == []


def test_the_example_shows_defaults_unless_a_comment_says_why() -> None:
    assert unexplained_differences(EXAMPLE.read_text()) == []


def test_the_example_is_a_valid_configuration() -> None:
    assert len(load_config(EXAMPLE, {}).relays) == 3


def test_the_checks_see_a_missing_key_and_an_unexplained_value() -> None:
    # Positive controls: the same walks over a doctored copy must complain.
    text = EXAMPLE.read_text()
    tree = yaml.safe_load(text)
    del tree["delivery"]["block_ms"]
    del tree["relays"][0]["egress_addresses"]
    del tree["dns"]
    assert missing_keys(Config, tree) == [
        "delivery.block_ms",
        "relays[].egress_addresses",
        "dns",
    ]
    changed = text.replace("  lease_s: 5 ", "  lease_s: 7 ", 1)
    assert changed != text
    assert unexplained_differences(changed) == [
        "cluster.lease_s: shows 7.0, default 5.0, no comment says why"
    ]
    explained = changed.replace("# a node silent", "# default 5; a node silent", 1)
    assert unexplained_differences(explained) == []
