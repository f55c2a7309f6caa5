"""The project's one YAML parser: safe loading that keeps file:line:column for every value.

Used by `policies.loader` and the gateway's config loader so that every operator error can name
the exact place and fix. Imports only PyYAML and the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

PathKey = tuple[str | int, ...]
# libyaml's parser when present (several times faster); the same safe constructor either way.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_PLAIN_TAGS = frozenset({"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"})


@dataclass(frozen=True, slots=True)
class Position:
    """A place in a source file, 1-based as editors show it."""

    source: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.source}:{self.line}:{self.column}"


@dataclass(frozen=True, slots=True)
class SourceError:
    """One problem in a source file, with the place and what to do about it."""

    position: Position
    message: str
    hint: str = ""

    def __str__(self) -> str:
        text = f"{self.position}: {self.message}"
        return f"{text} — {self.hint}" if self.hint else text


class SourceErrors(Exception):
    """Every problem found in one or more source files (never just the first)."""

    def __init__(self, errors: list[SourceError]) -> None:
        super().__init__("\n".join(str(error) for error in errors))
        self.errors = errors


@dataclass(frozen=True)
class YamlDocument:
    """Plain Python data from a YAML file, plus where each key and value stood."""

    data: Any
    source: str
    value_positions: dict[PathKey, Position] = field(repr=False)
    key_positions: dict[PathKey, Position] = field(repr=False)

    def position_of(self, path: PathKey, *, key: bool = False) -> Position:
        """The place of `path`, or of its nearest ancestor that exists in the file."""
        table = self.key_positions if key else self.value_positions
        for end in range(len(path), -1, -1):
            found = table.get(path[:end]) or self.value_positions.get(path[:end])
            if found is not None:
                return found
        return Position(self.source, 1, 1)


def _position(source: str, node: Node) -> Position:
    mark = node.start_mark
    return Position(source, mark.line + 1, mark.column + 1)


class _Builder:
    """Turns a composed node tree into data, recording positions and refusing duplicate keys."""

    def __init__(self, loader: yaml.SafeLoader, source: str) -> None:
        self.loader = loader
        self.source = source
        self.values: dict[PathKey, Position] = {}
        self.keys: dict[PathKey, Position] = {}
        self.errors: list[SourceError] = []

    def build(self, node: Node, path: PathKey) -> Any:
        self.values[path] = _position(self.source, node)
        # Only plain mappings and lists: a tag such as !!python/object is refused, never built.
        if isinstance(node, MappingNode | SequenceNode) and node.tag not in _PLAIN_TAGS:
            raise yaml.constructor.ConstructorError(
                None, None, f"unsupported tag {node.tag!r}", node.start_mark
            )
        if isinstance(node, MappingNode):
            return self._mapping(node, path)
        if isinstance(node, SequenceNode):
            return [self.build(item, (*path, index)) for index, item in enumerate(node.value)]
        assert isinstance(node, ScalarNode)
        return self._construct(node)

    def _construct(self, node: Node) -> Any:
        try:
            return self.loader.construct_object(node, deep=True)
        except ValueError as error:  # e.g. 2025-13-01 matches the date pattern but is no date
            raise yaml.constructor.ConstructorError(
                None, None, f"invalid value {node.value!r} ({error})", node.start_mark
            ) from None

    def _mapping(self, node: MappingNode, path: PathKey) -> dict[Any, Any]:
        self.loader.flatten_mapping(node)  # resolves YAML merge keys (<<) the way PyYAML does
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self._construct(key_node)
            where = _position(self.source, key_node)
            # Keys are names or numbers; `yes:`/`on:` would silently become True in YAML 1.1.
            if isinstance(key, bool) or not isinstance(key, str | int):
                self.errors.append(
                    SourceError(where, "a mapping key must be text", "put it in quotes: 'key':")
                )
                continue
            if key in result:
                first = self.keys.get((*path, key))
                self.errors.append(
                    SourceError(
                        where,
                        f"duplicate key '{key}'",
                        f"it is already set at line {first.line}; keep one" if first else "",
                    )
                )
                continue
            self.keys[(*path, key)] = where
            result[key] = self.build(value_node, (*path, key))
        return result


def parse_yaml(text: str, source: str) -> YamlDocument:
    """Parse one YAML document safely; raise SourceErrors naming every problem found."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return YamlDocument(None, source, {(): Position(source, 1, 1)}, {})
        builder = _Builder(loader, source)
        data = builder.build(node, ())
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = error.problem or error.context or "invalid YAML"
        raise SourceErrors(
            [SourceError(Position(source, line, column), f"invalid YAML: {problem}")]
        ) from None
    except yaml.YAMLError as error:
        raise SourceErrors(
            [SourceError(Position(source, 1, 1), f"invalid YAML: {error}")]
        ) from None
    finally:
        loader.dispose()
    if builder.errors:
        raise SourceErrors(builder.errors)
    return YamlDocument(data, source, builder.values, builder.keys)


def read_yaml(path: Path) -> YamlDocument:
    """Read and parse a YAML file; unreadable or non-UTF-8 files are SourceErrors too."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise SourceErrors(
            [SourceError(Position(str(path), 1, 1), f"cannot read the file: {reason}")]
        ) from None
    return parse_yaml(text, str(path))
