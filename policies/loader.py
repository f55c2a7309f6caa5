"""Read a policy directory (lists, policies, holidays, travel windows, test cases) and compile it.

The only module of `policies` that reads files; YAML comes through `policies.yaml_source` so that
every error names file:line:column and a fix. Every problem in every file is reported at once.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Final

from policies.criteria import (
    DEFAULT_ZONE,
    CompileContext,
    ListValue,
    PathKey,
    Report,
    as_date,
    suggest,
)
from policies.engine import CompiledPolicy, PolicySet, compile_policy
from policies.model import TravelWindow
from policies.yaml_source import Position, SourceError, SourceErrors, YamlDocument, read_yaml

TOP_KEYS: Final = ("lists", "policies", "holidays", "travel_windows", "tests")
TRAVEL_KEYS: Final = ("user", "countries", "from", "until", "note")
_LIST_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_COUNTRY = re.compile(r"^[A-Z]{2}$")


@dataclass(frozen=True, slots=True)
class RawCase:
    """One test case as written, with the document it came from (for error positions)."""

    document: YamlDocument
    path: PathKey
    data: object


@dataclass(frozen=True, slots=True)
class LoadedDirectory:
    """A compiled policy set plus the raw test cases found beside it."""

    policy_set: PolicySet
    cases: tuple[RawCase, ...]


def policy_files(directory: Path) -> list[Path]:
    """The YAML files of a policy directory, sorted by name (not recursive)."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in {".yaml", ".yml"})


def load_policy_dir(path: Path) -> PolicySet:
    """Load and compile every YAML file in `path`; raise SourceErrors listing every problem."""
    return load_directory(path).policy_set


def load_directory(path: Path) -> LoadedDirectory:  # noqa: PLR0912, PLR0915 — one pass per top-level key
    """Load `path` like `load_policy_dir`, also returning its test cases (for `tabiji-policy`)."""
    where = Position(str(path), 1, 1)
    if not path.is_dir():
        raise SourceErrors([SourceError(where, "not a directory", "give the policy directory")])
    files = policy_files(path)
    if not files:
        raise SourceErrors([SourceError(where, "no policy files (*.yaml) in this directory")])
    errors: list[SourceError] = []
    documents: list[YamlDocument] = []
    for file in files:
        try:
            documents.append(read_yaml(file))
        except SourceErrors as problem:
            errors.extend(problem.errors)
    _check_top_level(documents, errors)

    lists: dict[str, tuple[ListValue, ...]] = {}
    seen: dict[str, Position] = {}
    holidays: set[date] = set()
    travel: dict[str, list[TravelWindow]] = {}
    for doc in documents:
        data = doc.data if isinstance(doc.data, dict) else {}
        if "lists" in data:
            _read_lists(doc, data["lists"], lists, seen, errors)
        if "holidays" in data:
            _read_holidays(doc, data["holidays"], holidays, errors)
        if "travel_windows" in data:
            _read_travel(doc, data["travel_windows"], travel, errors)

    policies: dict[str, CompiledPolicy] = {}
    first_seen: dict[str, Position] = {}
    cases: list[RawCase] = []
    travel_frozen = {user: tuple(windows) for user, windows in travel.items()}
    for doc in documents:
        data = doc.data if isinstance(doc.data, dict) else {}
        ctx = CompileContext(
            lists, frozenset(holidays), travel_frozen, _reporter(doc, errors), DEFAULT_ZONE
        )
        raw_policies = data.get("policies", [])
        if not isinstance(raw_policies, list):
            errors.append(_at(doc, ("policies",), "'policies:' needs a list of policies"))
            raw_policies = []
        for index, raw in enumerate(raw_policies):
            policy = compile_policy(raw, ctx, ("policies", index))
            name = raw.get("name") if isinstance(raw, dict) else None
            if isinstance(name, str) and name:
                place = doc.position_of(("policies", index, "name"))
                if name in first_seen:
                    first = first_seen[name]
                    errors.append(
                        SourceError(
                            place,
                            f"policy '{name}' is defined twice",
                            f"it is already defined at {first}; rename or remove one",
                        )
                    )
                else:
                    first_seen[name] = place
            if policy is not None and policy.name not in policies:
                policies[policy.name] = policy
        raw_cases = data.get("tests", [])
        if not isinstance(raw_cases, list):
            errors.append(_at(doc, ("tests",), "'tests:' needs a list of test cases"))
            raw_cases = []
        cases.extend(RawCase(doc, ("tests", i), case) for i, case in enumerate(raw_cases))
    if errors:
        raise SourceErrors(_sorted(errors))
    sources = tuple(doc.source for doc in documents)
    policy_set = PolicySet.of(policies, content_hash(documents), sources)
    return LoadedDirectory(policy_set, tuple(cases))


def content_hash(documents: list[YamlDocument]) -> str:
    """sha256 hex over each file's name and canonical data (comments and layout do not count;
    test cases do not either, so adding a test does not change the policy set's identity)."""
    digest = hashlib.sha256()
    for doc in sorted(documents, key=lambda d: Path(d.source).name):
        data = doc.data
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k != "tests"}
        digest.update(Path(doc.source).name.encode())
        digest.update(b"\0")
        digest.update(_canonical(data).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _canonical(data: object) -> str:
    return json.dumps(_plain(data), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _plain(value: object) -> object:
    """JSON-ready data that keeps YAML's types apart (the date 2025-01-01 is not the text)."""
    if isinstance(value, dict):
        return {f"{type(k).__name__}:{_scalar(k)}": _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, date | datetime | bytes):
        return {type(value).__name__: _scalar(value)}
    return value


def _scalar(value: object) -> str:
    return value.isoformat() if isinstance(value, date | datetime) else str(value)


def _sorted(errors: list[SourceError]) -> list[SourceError]:
    return sorted(errors, key=lambda e: (e.position.source, e.position.line, e.position.column))


def _at(
    doc: YamlDocument, path: PathKey, message: str, hint: str = "", *, key: bool = False
) -> SourceError:
    return SourceError(doc.position_of(path, key=key), message, hint)


def _reporter(doc: YamlDocument, errors: list[SourceError]) -> Report:
    def report(where: object, message: str, hint: str, key: bool) -> None:
        if isinstance(where, Position):
            place = where
        elif isinstance(where, tuple):
            place = doc.position_of(where, key=key)
        else:
            place = Position(doc.source, 1, 1)
        errors.append(SourceError(place, message, hint))

    return report


def _check_top_level(documents: list[YamlDocument], errors: list[SourceError]) -> None:
    for doc in documents:
        if doc.data is None:
            continue
        if not isinstance(doc.data, dict):
            errors.append(
                _at(doc, (), "a policy file is a mapping", "its keys: " + ", ".join(TOP_KEYS))
            )
            continue
        for key in doc.data:
            if key not in TOP_KEYS:
                hint = suggest(str(key), TOP_KEYS) or "its keys: " + ", ".join(TOP_KEYS)
                errors.append(_at(doc, (key,), f"unknown top-level key '{key}'", hint, key=True))


def _read_lists(
    doc: YamlDocument,
    data: object,
    lists: dict[str, tuple[ListValue, ...]],
    seen: dict[str, Position],
    errors: list[SourceError],
) -> None:
    if not isinstance(data, dict):
        errors.append(_at(doc, ("lists",), "'lists:' needs a mapping of list names to values"))
        return
    for name, values in data.items():
        place = doc.position_of(("lists", name), key=True)
        if not isinstance(name, str) or not _LIST_NAME.match(name):
            errors.append(
                SourceError(place, f"'{name}' is not a list name", "use letters, digits, _ . -")
            )
            continue
        if name in seen:
            errors.append(
                SourceError(place, f"list '{name}' is defined twice", f"first at {seen[name]}")
            )
            continue
        seen[name] = place
        raw = values if isinstance(values, list) else [values]
        items: list[ListValue] = []
        for index, value in enumerate(raw):
            path: PathKey = ("lists", name, index) if isinstance(values, list) else ("lists", name)
            if isinstance(value, list | dict) or value is None:
                errors.append(_at(doc, path, "a list holds plain values"))
            elif isinstance(value, str) and value.startswith("$") and not value.startswith("$$"):
                errors.append(
                    _at(doc, path, "a list cannot refer to another list", "write the values out")
                )
            else:
                plain = value[1:] if isinstance(value, str) and value.startswith("$$") else value
                items.append(ListValue(plain, doc.position_of(path)))
        if not raw:
            errors.append(SourceError(place, f"list '{name}' is empty", "give it values"))
        lists[name] = tuple(items)


def _read_holidays(
    doc: YamlDocument, data: object, out: set[date], errors: list[SourceError]
) -> None:
    hint = "write a list of dates (YYYY-MM-DD), or of {date: YYYY-MM-DD, name: 祝日名}"
    if not isinstance(data, list):
        errors.append(_at(doc, ("holidays",), "'holidays:' needs a list of dates", hint))
        return
    for index, value in enumerate(data):
        path: PathKey = ("holidays", index)
        if isinstance(value, dict):
            unknown = [key for key in value if key not in {"date", "name"}]
            if unknown:
                errors.append(
                    _at(
                        doc,
                        (*path, unknown[0]),
                        f"unknown key '{unknown[0]}' in a holiday",
                        "a holiday has: date, name",
                        key=True,
                    )
                )
                continue
            path, written = (*path, "date"), value.get("date")
        else:
            written = value
        found = as_date(written)
        if found is None:
            errors.append(_at(doc, path, f"'{written}' is not a date", hint))
        else:
            out.add(found)


def _read_travel(
    doc: YamlDocument, data: object, out: dict[str, list[TravelWindow]], errors: list[SourceError]
) -> None:
    if not isinstance(data, list):
        errors.append(_at(doc, ("travel_windows",), "'travel_windows:' needs a list of trips"))
        return
    for index, item in enumerate(data):
        path: PathKey = ("travel_windows", index)
        if not isinstance(item, dict):
            errors.append(_at(doc, path, "a trip is a mapping: user, countries, from, until"))
            continue
        bad = False
        for key in item:
            if key not in TRAVEL_KEYS:
                hint = suggest(str(key), TRAVEL_KEYS) or "its keys: " + ", ".join(TRAVEL_KEYS)
                errors.append(
                    _at(doc, (*path, key), f"unknown key '{key}' in a trip", hint, key=True)
                )
                bad = True
        for key in ("user", "countries", "from", "until"):
            if key not in item:
                errors.append(_at(doc, path, f"a trip needs '{key}:'"))
                bad = True
        if bad:
            continue
        user, countries, note = item["user"], item["countries"], item.get("note", "")
        start, end = as_date(item["from"]), as_date(item["until"])
        if not isinstance(user, str) or not user:
            errors.append(_at(doc, (*path, "user"), "'user' is an email address or user id"))
            continue
        codes = countries if isinstance(countries, list) else [countries]
        valid = [c for c in codes if isinstance(c, str) and _COUNTRY.match(c.upper())]
        if len(valid) != len(codes) or not codes:
            errors.append(
                _at(doc, (*path, "countries"), "'countries' are two-letter codes", "such as US")
            )
            continue
        if start is None or end is None:
            key = "from" if start is None else "until"
            errors.append(_at(doc, (*path, key), f"'{key}' is not a date", "YYYY-MM-DD"))
            continue
        if start > end:
            errors.append(_at(doc, (*path, "from"), f"'from' {start} is after 'until' {end}"))
            continue
        window = TravelWindow(
            user.casefold(), frozenset(c.upper() for c in valid), start, end, str(note or "")
        )
        out.setdefault(window.user, []).append(window)
