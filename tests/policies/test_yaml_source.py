"""The one YAML parser: positions for every value, and refusals for duplicate or odd keys."""

from __future__ import annotations

import pytest

from policies.yaml_source import Position, SourceErrors, parse_yaml


def test_positions_of_keys_and_values() -> None:
    """Every key and value keeps its 1-based line and column."""
    document = parse_yaml("a: 1\nb:\n  - x: 2\n    y: [1, 2]\n", "f.yaml")
    assert document.data == {"a": 1, "b": [{"x": 2, "y": [1, 2]}]}
    assert document.position_of(("b", 0, "y", 1)) == Position("f.yaml", 4, 12)
    assert document.position_of(("b", 0, "y"), key=True) == Position("f.yaml", 4, 5)
    assert document.position_of(("b", 0, "missing")) == Position("f.yaml", 3, 5)


def test_duplicate_keys_are_errors() -> None:
    """A key given twice names both lines."""
    with pytest.raises(SourceErrors) as caught:
        parse_yaml("a: 1\nb: 2\na: 3\n", "f.yaml")
    assert (
        str(caught.value) == "f.yaml:3:1: duplicate key 'a' — it is already set at line 1; keep one"
    )


def test_boolean_looking_keys_are_refused() -> None:
    """`yes:` would silently become True in YAML 1.1, so a key must be text."""
    with pytest.raises(SourceErrors) as caught:
        parse_yaml("yes: 1\n", "f.yaml")
    assert str(caught.value) == "f.yaml:1:1: a mapping key must be text — put it in quotes: 'key':"


def test_syntax_errors_have_a_place() -> None:
    """Broken YAML is one precise error, not a traceback."""
    with pytest.raises(SourceErrors) as caught:
        parse_yaml("a: [1, 2\nb: 3\n", "f.yaml")
    assert str(caught.value) == "f.yaml:2:2: invalid YAML: did not find expected ',' or ']'"


def test_unsafe_tags_are_refused() -> None:
    """Python object tags are never constructed (safe loading only)."""
    with pytest.raises(SourceErrors) as caught:
        parse_yaml("a: !!python/object/apply:os.system ['true']\n", "f.yaml")
    assert str(caught.value) == (
        "f.yaml:1:4: invalid YAML: unsupported tag "
        "'tag:yaml.org,2002:python/object/apply:os.system'"
    )


def test_empty_document_is_none() -> None:
    """An empty file is no data, not an error (callers decide what that means)."""
    assert parse_yaml("", "f.yaml").data is None
