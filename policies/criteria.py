"""The criteria of the policy language: one small compile function per criterion, in a registry.

Each compile function checks its YAML value (already plain Python data) once, reports every
problem through the CompileContext, and returns a Criterion whose `check(facts)` answers with the
reasons it does *not* hold (an empty tuple means it holds). Imports only the standard library.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import lru_cache
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from policies.model import FALSE, TRUE, UNKNOWN, AccessRequest, Posture, TravelWindow, Tri
from policies.reasons import UNKNOWN_FACT, Reason

PathKey = tuple[str | int, ...]
"""Where a value stands in the YAML document being compiled (keys and list indexes)."""

DEFAULT_ZONE: Final = "Asia/Tokyo"


@dataclass(frozen=True, slots=True)
class ListValue:
    """One value of a named list, with where it was written (an opaque place for error reports)."""

    value: object
    where: object


Report = Callable[[object, str, str, bool], None]
"""Reports a problem: (where — a PathKey in the current file or a ListValue's place, message,
hint, whether the problem is the key rather than the value)."""


@dataclass(frozen=True, slots=True)
class CompileContext:
    """What a criterion may consult while compiling: named lists, holidays, travel windows."""

    lists: Mapping[str, tuple[ListValue, ...]]
    holidays: frozenset[date]
    travel_windows: Mapping[str, tuple[TravelWindow, ...]]
    report: Report
    zone: str = DEFAULT_ZONE

    def error(self, where: object, message: str, hint: str = "", *, key: bool = False) -> None:
        """Report one problem; compiling goes on so that every problem is found."""
        self.report(where, message, hint, key)


class Facts:
    """The request and the moment being decided, with per-decision caches (local times)."""

    __slots__ = ("_local", "_zone", "now", "request")

    def __init__(self, request: AccessRequest, now: datetime) -> None:
        self.request = request
        self.now = now
        self._zone: ZoneInfo | None = None
        self._local = now

    def local(self, zone: ZoneInfo) -> datetime:
        """`now` as a wall-clock time in `zone` (the last zone asked for is cached)."""
        if self._zone is not zone:
            self._local = self.now.astimezone(zone)
            self._zone = zone
        return self._local


Reasons = tuple[Reason, ...]
Check = Callable[[Facts], Reasons]


@dataclass(frozen=True, slots=True)
class Criterion:
    """A compiled criterion: `check` returns why it does not hold (empty: it holds)."""

    kind: str
    check: Check
    words: str  # plain English: "the user is in group staff"
    denied: Reason  # the reason to give when this criterion holding is what denies
    keys: frozenset[str] | None = None
    """For the engine's rule index: the only fact values under which `check` can hold — the
    groups (`group`), upper-case methods (`method`) or first path segments (`path`, see
    `path_segment`); None when the criterion cannot be indexed that way."""


Compiler = Callable[[object, CompileContext, PathKey], Criterion | None]


@dataclass(frozen=True, slots=True)
class CriterionKind:
    """A criterion of the language: its name, a one-line summary and its compile function."""

    name: str
    summary: str
    compile: Compiler


REGISTRY: dict[str, CriterionKind] = {}
"""Every criterion, by the name written in YAML."""


def _register(name: str, summary: str) -> Callable[[Compiler], Compiler]:
    def add(function: Compiler) -> Compiler:
        REGISTRY[name] = CriterionKind(name, summary, function)
        return function

    return add


def state_of(reasons: Reasons) -> Tri:
    """TRUE for no reasons; UNKNOWN when every reason is a missing fact; FALSE otherwise."""
    if not reasons:
        return TRUE
    found = STATES.get(reasons)
    if found is None:
        found = UNKNOWN if all(r in UNKNOWN_FACT for r in reasons) else FALSE
        if len(STATES) < 4096:
            STATES[reasons] = found
    return found


STATES: dict[Reasons, Tri] = {}
"""`state_of`'s memory (criteria answer with a few constant tuples): a hot path may look a tuple
up here directly and call `state_of` only when it is missing."""


def suggest(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """A did-you-mean hint for a misspelt `word`, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{prefix}{close[0]}'?" if close else ""


# --- reading the YAML value of a criterion ---------------------------------------------------


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _type_name(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, list | dict):
        return "a list" if isinstance(value, list) else "a mapping"
    return f"'{_show(value)}'"


def _true_only(name: str, arg: object, ctx: CompileContext, path: PathKey) -> bool:
    if arg is True:
        return True
    if arg is False:
        ctx.error(
            path,
            f"'{name}: false' is not allowed",
            f"write '{name}: true', or put it under 'none:' to require the opposite",
        )
    else:
        ctx.error(path, f"'{name}' takes only 'true', found {_type_name(arg)}")
    return False


def _mapping(
    arg: object, ctx: CompileContext, path: PathKey, allowed: Sequence[str], what: str
) -> dict[str, object] | None:
    """`arg` as a mapping whose keys are all in `allowed`, or None after reporting."""
    if not isinstance(arg, dict):
        keys = ", ".join(allowed)
        ctx.error(path, f"'{what}' needs a mapping, found {_type_name(arg)}", f"its keys: {keys}")
        return None
    ok = True
    for key in arg:
        if key not in allowed:
            ok = False
            hint = suggest(str(key), allowed) or "its keys: " + ", ".join(allowed)
            ctx.error((*path, key), f"unknown key '{key}' in '{what}'", hint, key=True)
    return arg if ok else None


def _items(arg: object, ctx: CompileContext, path: PathKey) -> list[ListValue] | None:
    """A scalar or a list, with `$name` list references spliced in; None after reporting."""
    raw = arg if isinstance(arg, list) else [arg]
    out: list[ListValue] = []
    ok = True
    for index, item in enumerate(raw):
        where: PathKey = (*path, index) if isinstance(arg, list) else path
        if isinstance(item, str) and item.startswith("$$"):
            out.append(ListValue(item[1:], where))
        elif isinstance(item, str) and item.startswith("$"):
            name = item[1:]
            values = ctx.lists.get(name)
            if values is None:
                ok = False
                ctx.error(where, f"unknown list '{item}'", suggest(name, ctx.lists, "$"))
            else:
                out.extend(values)
        elif isinstance(item, list | dict):
            ok = False
            ctx.error(where, f"expected a value, found {_type_name(item)}")
        else:
            out.append(ListValue(item, where))
    if ok and not out:
        ctx.error(path, "an empty list matches nothing", "write at least one value")
        return None
    return out if ok else None


def _texts(arg: object, ctx: CompileContext, path: PathKey) -> list[tuple[str, object]] | None:
    """Like `_items`, but every value must be text; returns (text, where) pairs."""
    items = _items(arg, ctx, path)
    if items is None:
        return None
    out: list[tuple[str, object]] = []
    ok = True
    for item in items:
        if isinstance(item.value, str) and item.value:
            out.append((item.value, item.where))
        else:
            ok = False
            hint = (
                "quote it: YAML reads yes/no/on/off as true/false"
                if isinstance(item.value, bool)
                else "quote it"
            )
            ctx.error(item.where, f"expected text, found {_type_name(item.value)}", hint)
    return out if ok else None


def _words(arg: object) -> str:
    raw = arg if isinstance(arg, list) else [arg]
    shown = [_show(item) for item in raw]
    if len(shown) == 1:
        return shown[0]
    return ", ".join(shown[:-1]) + " or " + shown[-1]


_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(arg: object, ctx: CompileContext, path: PathKey) -> int | None:
    """A positive duration such as 30s, 15m, 2h or 7d, in seconds."""
    match = _DURATION.match(arg) if isinstance(arg, str) else None
    if match is None or int(match.group(1)) == 0:
        ctx.error(
            path,
            f"{_type_name(arg)} is not a duration",
            "write a positive number and a unit: 30s, 15m, 2h or 7d",
        )
        return None
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


_VERSION = re.compile(r"^\s*(?:>=\s*)?(\d+(?:\.\d+)*)\s*$")
_FACT_VERSION = re.compile(r"(\d+(?:\.\d+)*)")


def _min_version(arg: object, ctx: CompileContext, path: PathKey) -> tuple[int, ...] | None:
    """A minimum version: '14.4' or '>= 14.4'."""
    text = str(arg) if isinstance(arg, int | float) and not isinstance(arg, bool) else arg
    match = _VERSION.match(text) if isinstance(text, str) else None
    if match is None:
        hint = (
            "only a minimum can be required: write '>= 1.2' or just '1.2'"
            if isinstance(text, str) and re.match(r"^\s*(<|>|==|!=|=)", text)
            else "write a version made of numbers and dots, such as '14.4' or '>= 10.0.22631'"
        )
        ctx.error(path, f"{_type_name(arg)} is not a minimum version", hint)
        return None
    return tuple(int(part) for part in match.group(1).split("."))


@lru_cache(maxsize=1024)
def _fact_version(text: str) -> tuple[int, ...] | None:
    match = _FACT_VERSION.search(text)
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


# --- string matchers ----------------------------------------------------------------------------

MATCH_OPERATORS: Final = ("is", "in", "not_in", "starts_with", "ends_with", "contains", "matches")


@dataclass(frozen=True, slots=True)
class Matcher:
    """A compiled string matcher; a negative one (`not_in`) must hold for every value of a list."""

    test: Callable[[str], bool]
    negative: bool
    words: str

    def any_of(self, values: Iterable[str]) -> bool:
        """Whether a multi-valued fact matches: some value (or, for `not_in`, every value)."""
        if self.negative:
            return all(self.test(value) for value in values)
        return any(self.test(value) for value in values)


def _matcher(
    arg: object,
    ctx: CompileContext,
    path: PathKey,
    *,
    fold: bool,
    what: str,
    extra: Sequence[str] = (),
) -> Matcher | None:
    """`value`, `[values]`, or a mapping with exactly one of MATCH_OPERATORS (plus `extra` keys)."""
    if not isinstance(arg, dict):
        return _matcher_op("in", arg, ctx, path, fold=fold)
    allowed = (*extra, *MATCH_OPERATORS)
    if _mapping(arg, ctx, path, allowed, what) is None:
        return None
    ops = [key for key in arg if key in MATCH_OPERATORS]
    if len(ops) != 1:
        ctx.error(
            path,
            f"'{what}' needs exactly one of: {', '.join(MATCH_OPERATORS)}",
            "use 'any:' or 'all:' to combine several",
        )
        return None
    return _matcher_op(ops[0], arg[ops[0]], ctx, (*path, ops[0]), fold=fold)


def _matcher_op(  # noqa: PLR0911 — one return per operator reads better than a table of lambdas
    op: str, arg: object, ctx: CompileContext, path: PathKey, *, fold: bool
) -> Matcher | None:
    texts = _texts(arg, ctx, path)
    if texts is None:
        return None
    values = tuple(t.casefold() if fold else t for t, _ in texts)
    shown = _words(arg)
    if op in {"is", "in"}:
        wanted = frozenset(values)
        return Matcher(wanted.__contains__, False, f"is {shown}")
    if op == "not_in":
        unwanted = frozenset(values)
        return Matcher(lambda v: v not in unwanted, True, f"is not {shown}")
    if op == "starts_with":
        return Matcher(lambda v: v.startswith(values), False, f"starts with {shown}")
    if op == "ends_with":
        return Matcher(lambda v: v.endswith(values), False, f"ends with {shown}")
    if op == "contains":
        return Matcher(lambda v: any(part in v for part in values), False, f"contains {shown}")
    patterns = []
    for (text, where), value in zip(texts, values, strict=True):
        try:
            patterns.append(re.compile(value, re.IGNORECASE if fold else 0))
        except re.error as error:
            ctx.error(where, f"'{text}' is not a valid pattern: {error}")
    if len(patterns) != len(values):
        return None
    return Matcher(
        lambda v: any(p.fullmatch(v) for p in patterns), False, f"matches the whole of {shown}"
    )


# --- identity ---------------------------------------------------------------------------------

_UNAUTH: Final = (Reason.USER_UNAUTHENTICATED,)
_OK: Final[Reasons] = ()


def _one(reason: Reason) -> Reasons:
    return (reason,)


@_register("accept", "always holds")
def _accept(arg: object, ctx: CompileContext, path: PathKey) -> Criterion | None:
    if not _true_only("accept", arg, ctx, path):
        return None
    return Criterion("accept", lambda _f: _OK, "always", Reason.REJECTED)


@_register("reject", "never holds")
def _reject(arg: object, ctx: CompileContext, path: PathKey) -> Criterion | None:
    if not _true_only("reject", arg, ctx, path):
        return None
    rejected = _one(Reason.REJECTED)
    return Criterion("reject", lambda _f: rejected, "never", Reason.REJECTED)


@_register("authenticated", "the user has signed in")
def _authenticated(arg: object, ctx: CompileContext, path: PathKey) -> Criterion | None:
    if not _true_only("authenticated", arg, ctx, path):
        return None

    def check(f: Facts) -> Reasons:
        return _OK if f.request.subject is not None else _UNAUTH

    return Criterion("authenticated", check, "the user has signed in", Reason.AUTHENTICATED_DENIED)


@_register("user", "the user's subject identifier (OIDC 'sub')")
def _user(arg: object, ctx: CompileContext, path: PathKey) -> Criterion | None:
    matcher = _matcher(arg, ctx, path, fold=False, what="user")
    if matcher is None:
        return None
    test, fail = matcher.test, _one(Reason.USER_NOT_ALLOWED)

    def check(f: Facts) -> Reasons:
        subject = f.request.subject
        if subject is None:
            return _UNAUTH
        return _OK if test(subject.subject) else fail

    return Criterion("user", check, f"the user id {matcher.words}", Reason.USER_DENIED)


def _verified_email(f: Facts) -> str | Reasons:
    subject = f.request.subject
    if subject is None:
        return _UNAUTH
    if not subject.email or not subject.email_verified:
        return _UNVERIFIED  # OIDC Core §5.1: an unverified email must not be trusted
    return subject.email.casefold()


_UNVERIFIED: Final = (Reason.EMAIL_UNVERIFIED,)


@_register("email", "the user's verified email address")
def _email(arg: object, ctx: CompileContext, path: PathKey) -> Criterion | None:
    matcher = _matcher(arg, ctx, path, fold=True, what="email")
    if matcher is None:
        return None
    test, fail = matcher.test, _one(Reason.EMAIL_NOT_ALLOWED)

    def check(f: Facts) -> Reasons:
        email = _verified_email(f)
        if not isinstance(email, str):
            return email
        return _OK if test(email) else fail

    return Criterion("email", check, f"the verified email {matcher.words}", Reason.EMAIL_DENIED)


@_register("email_domain", "the domain of the user's verified email address")
def _email_domain(arg: object, ctx: CompileContext, path: PathKey) -> Criterion | None:
    texts = _texts(arg, ctx, path)
    if texts is None:
        return None
    domains = frozenset(text.removeprefix("@").casefold() for text, _ in texts)
    fail = _one(Reason.EMAIL_DOMAIN_NOT_ALLOWED)

    def check(f: Facts) -> Reasons:
        email = _verified_email(f)
        if not isinstance(email, str):
            return email
        return _OK if email.rpartition("@")[2] in domains else fail

    words = f"the verified email is at {_words(arg)}"
    return Criterion("email_domain", check, words, Reason.EMAIL_DOMAIN_DENIED)


@_register("group", "the user is in one of these groups")
def _group(arg: object, ctx: CompileContext, path: PathKey) -> Criterion | None:
    texts = _texts(arg, ctx, path)
    if texts is None:
        return None
    groups = frozenset(text for text, _ in texts)
    fail = _one(Reason.GROUP_MISSING)

    def check(f: Facts) -> Reasons:
        subject = f.request.subject
        if subject is None:
            return _UNAUTH
        return fail if groups.isdisjoint(subject.groups) else _OK

    words = f"the user is in group {_words(arg)}"
    return Criterion("group", check, words, Reason.GROUP_DENIED, keys=groups)


def _claim_values(value: object) -> tuple[str, ...] | None:
    if isinstance(value, bool):
        return ("true" if value else "false",)
    if isinstance(value, str | int | float):
        return (str(value),)
    if isinstance(value, list | tuple | frozenset | set):
        out = [v for item in value for v in (_claim_values(item) or ())]
        return tuple(out)
    return None


@_register("claim", "an attribute (claim) the identity provider sent")
def _claim(arg: object, ctx: CompileContext, path: PathKey) -> Criterion | None:
    if not isinstance(arg, dict) or not isinstance(arg.get("name"), str):
        hint = "for example: claim: {name: department, is: 総務課}"
        ctx.error(path, "'claim' needs 'name:' (the claim to look at) and a matcher", hint)
        return None
    matcher = _matcher(arg, ctx, path, fold=False, what="claim", extra=("name",))
    if matcher is None:
        return None
    name = str(arg["name"])
    missing, fail = _one(Reason.CLAIM_MISSING), _one(Reason.CLAIM_MISMATCH)

    def check(f: Facts) -> Reasons:
        subject = f.request.subject
        if subject is None:
            return _UNAUTH
        values = _claim_values(subject.claims.get(name))
        if values is None:
            return missing
        return _OK if matcher.any_of(values) else fail

    return Criterion("claim", check, f"the claim '{name}' {matcher.words}", Reason.CLAIM_DENIED)


MFA_AMR: Final = frozenset({"mfa"})  # RFC 8176 §2: "mfa" = multiple-factor authentication
MFA_ACR: Final = frozenset({"http://schemas.openid.net/pape/policies/2007/06/multi-factor"})


@_register("mfa", "the user signed in with multi-factor authentication (amr/acr)")
def _mfa(arg: object, ctx: CompileContext, path: PathKey) -> Criterion | None:
    amr, acr = MFA_AMR, MFA_ACR
    words = "the user signed in with multi-factor authentication"
    if isinstance(arg, dict):
        spec = _mapping(arg, ctx, path, ("amr", "acr"), "mfa")
        if spec is None:
            return None
        amr_texts = _texts(spec["amr"], ctx, (*path, "amr")) if "amr" in spec else []
        acr_texts = _texts(spec["acr"], ctx, (*path, "acr")) if "acr" in spec else []
        if amr_texts is None or acr_texts is None:
            return None
        if not amr_texts and not acr_texts:
            ctx.error(path, "'mfa' needs 'amr:' or 'acr:' values", "or write 'mfa: true'")
            return None
        amr = frozenset(text for text, _ in amr_texts)
        acr = frozenset(text for text, _ in acr_texts)
        # Only the lists IT wrote: an empty one has no words (and `mfa: {amr: [otp]}` is valid).
        listed = [(name, values) for name, values in (("amr", amr), ("acr", acr)) if values]
        words += " (" + "; ".join(f"{name} {_words(sorted(v))}" for name, v in listed) + ")"
    elif not _true_only("mfa", arg, ctx, path):
        return None
    fail = _one(Reason.MFA_REQUIRED)

    def check(f: Facts) -> Reasons:
        subject = f.request.subject
        if subject is None:
            return _UNAUTH
        if not amr.isdisjoint(subject.amr) or subject.acr in acr:
            return _OK
        return fail

    return Criterion("mfa", check, words, Reason.MFA_DENIED)


# --- the request itself -----------------------------------------------------------------------

_METHOD = re.compile(r"^[A-Z]+$")


@_register("method", "the HTTP method")
def _method(arg: object, ctx: CompileContext, path: PathKey) -> Criterion | None:
    texts = _texts(arg, ctx, path)
    if texts is None:
        return None
    methods = frozenset(text.upper() for text, _ in texts)
    for text, where in texts:
        if not _METHOD.match(text.upper()):
            ctx.error(where, f"'{text}' is not an HTTP method", "for example: GET, POST")
            return None
    fail = _one(Reason.METHOD_NOT_ALLOWED)

    def check(f: Facts) -> Reasons:
        return _OK if f.request.resource.method.upper() in methods else fail

    words = f"the method is {_words(arg)}"
    return Criterion("method", check, words, Reason.METHOD_NOT_ALLOWED, keys=methods)


def glob_to_regex(glob: str) -> str:
    """A path glob as a regex: `*` within one segment, `**` across segments, `?` one character."""
    out = []
    index = 0
    while index < len(glob):
        char = glob[index]
        if glob.startswith("**", index):
            out.append(".*")
            index += 2
            continue
        out.append("[^/]*" if char == "*" else "[^/]" if char == "?" else re.escape(char))
        index += 1
    return "".join(out)


def path_segment(path: str) -> str | None:
    """The first segment of a path (`/a/b` → `a`, `/` → ``); None if it does not start with /.

    Every path criterion's values start with `/`, so a path that holds one of them has the same
    first segment as the value (for a prefix: as the prefix; for a glob: as its literal start).
    """
    return path.split("/", 2)[1] if path[:1] == "/" else None


def _glob_segment(glob: str) -> str | None:
    """The first segment every path matching `glob` has, or None if it holds a wildcard."""
    segment = path_segment(glob)
    return None if segment is None or "*" in segment or "?" in segment else segment


def _prefix_test(bare: tuple[str, ...]) -> Callable[[str], bool]:
    under, exact = tuple(v + "/" for v in bare), frozenset(bare)
    return lambda p: p in exact or p.startswith(under)


def _pattern_test(pattern: re.Pattern[str]) -> Callable[[str], bool]:
    return lambda p: pattern.fullmatch(p) is not None


@_register("path", "the normalised path: exact, prefix (whole segments) or glob")
def _path(arg: object, ctx: CompileContext, path: PathKey) -> Criterion | None:
    if not isinstance(arg, dict):
        ctx.error(
            path,
            "'path' needs a mapping: exact, prefix or glob",
            "for example: path: {prefix: /api}",
        )
        return None
    spec = _mapping(arg, ctx, path, ("exact", "prefix", "glob"), "path")
    if spec is None:
        return None
    tests: list[Callable[[str], bool]] = []
    words = []
    segments: set[str | None] = set()  # None: some value can match paths under any segment
    prefixes: tuple[str, ...] = ()
    for key, value in spec.items():
        texts = _texts(value, ctx, (*path, key))
        if texts is None:
            return None
        for text, where in texts:
            if not text.startswith("/"):
                ctx.error(where, f"a path starts with '/', found '{text}'")
                return None
        values = tuple(text for text, _ in texts)
        if key == "exact":
            exact = frozenset(values)
            tests.append(exact.__contains__)
            segments.update(path_segment(v) for v in values)
            words.append(f"the path is {_words(value)}")
        elif key == "prefix":
            bare = prefixes = tuple(v.rstrip("/") for v in values)
            if "" in bare:  # the prefix "/" covers every path
                tests.append(lambda _p: True)
            tests.append(_prefix_test(bare))
            segments.update(path_segment(v) if v else None for v in bare)
            words.append(f"the path is {_words(value)} or below it")
        else:
            pattern = re.compile("|".join(f"(?:{glob_to_regex(v)})" for v in values))
            tests.append(_pattern_test(pattern))
            segments.update(_glob_segment(v) for v in values)
            words.append(f"the path matches {_words(value)}")
    only_prefixes = prefixes if len(tests) == 1 and set(spec) == {"prefix"} else None
    check = _path_check(tests, only_prefixes)
    keys = None if None in segments else frozenset(s for s in segments if s is not None)
    return Criterion("path", check, " or ".join(words), Reason.PATH_NOT_ALLOWED, keys=keys)


def _path_check(tests: list[Callable[[str], bool]], prefixes: tuple[str, ...] | None) -> Check:
    """The check of a path criterion; a lone `prefix:` (the usual case) without nested calls."""
    fail = _one(Reason.PATH_NOT_ALLOWED)
    if prefixes is not None:
        whole, under = frozenset(prefixes), tuple(v + "/" for v in prefixes)

        def check_prefix(f: Facts) -> Reasons:
            p = f.request.resource.path
            return _OK if p in whole or p.startswith(under) else fail

        return check_prefix
    only = tests[0]
    if len(tests) == 1:

        def check_one(f: Facts) -> Reasons:
            return _OK if only(f.request.resource.path) else fail

        return check_one

    def check_any(f: Facts) -> Reasons:
        p = f.request.resource.path
        return _OK if any(t(p) for t in tests) else fail

    return check_any


def _in_or_not_in(
    arg: object, ctx: CompileContext, path: PathKey, what: str
) -> tuple[object, PathKey, bool] | None:
    """A plain value/list means `in`; a mapping holds exactly one of `in:` / `not_in:`."""
    if not isinstance(arg, dict):
        return arg, path, False
    spec = _mapping(arg, ctx, path, ("in", "not_in"), what)
    if spec is None:
        return None
    if len(spec) != 1:
        ctx.error(path, f"'{what}' needs exactly one of: in, not_in")
        return None
    key = next(iter(spec))
    return spec[key], (*path, key), key == "not_in"


@lru_cache(maxsize=4096)
def parse_ip(text: str) -> tuple[int, int] | None:
    """(version, integer) of an IP address text, IPv4-mapped IPv6 counted as IPv4; None if bad."""
    try:
        address = ipaddress.ip_address(text.strip().split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.version, int(address)


@_register("source_ip", "the client's IP address is in these networks (CIDR, IPv4 or IPv6)")
def _source_ip(arg: object, ctx: CompileContext, path: PathKey) -> Criterion | None:
    parsed = _in_or_not_in(arg, ctx, path, "source_ip")
    if parsed is None:
        return None
    value, where, negative = parsed
    texts = _texts(value, ctx, where)
    if texts is None:
        return None
    ranges: list[tuple[int, int, int]] = []
    for text, place in texts:
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError as error:
            hint = "write an address or a network such as 192.0.2.0/24 or 2001:db8::/32"
            if "host bits set" in str(error):
                hint = f"did you mean '{ipaddress.ip_network(text, strict=False)}'?"
            ctx.error(place, f"'{text}' is not an IP network", hint)
            continue
        first, last = int(network.network_address), int(network.broadcast_address)
        ranges.append((network.version, first, last))
    if len(ranges) != len(texts):
        return None
    frozen = tuple(ranges)
    unknown, fail = _one(Reason.SOURCE_IP_UNKNOWN), _one(Reason.SOURCE_IP_NOT_ALLOWED)

    def check(f: Facts) -> Reasons:
        text = f.request.source_ip
        ip = parse_ip(text) if text else None
        if ip is None:
            return unknown
        version, number = ip
        inside = False
        for v, first, last in frozen:
            if v == version and first <= number <= last:
                inside = True
                break
        return _OK if inside != negative else fail

    words = f"the client address is {'not ' if negative else ''}in {_words(value)}"
    return Criterion("source_ip", check, words, Reason.SOURCE_IP_NOT_ALLOWED)


_COUNTRY = re.compile(r"^[A-Z]{2}$")


@_register("country", "the country of the client's IP address (GeoIP)")
def _country(arg: object, ctx: CompileContext, path: PathKey) -> Criterion | None:
    parsed = _in_or_not_in(arg, ctx, path, "country")
    if parsed is None:
        return None
    value, where, negative = parsed
    texts = _texts(value, ctx, where)
    if texts is None:
        return None
    for text, place in texts:
        if not _COUNTRY.match(text.upper()):
            ctx.error(place, f"'{text}' is not a country code", "write two letters, such as JP")
            return None
    countries = frozenset(text.upper() for text, _ in texts)
    unknown, fail = _one(Reason.COUNTRY_UNKNOWN), _one(Reason.COUNTRY_NOT_ALLOWED)

    def check(f: Facts) -> Reasons:
        country = f.request.country
        if not country:
            return unknown
        return _OK if (country.upper() in countries) != negative else fail

    words = f"the request comes from {'outside ' if negative else ''}{_words(value)}"
    return Criterion("country", check, words, Reason.COUNTRY_NOT_ALLOWED)


# --- time ---------------------------------------------------------------------------------------

WEEKDAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WEEKDAYS_JA: Final = ("月", "火", "水", "木", "金", "土", "日")
_HOURS = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


def _zone(arg: object, ctx: CompileContext, path: PathKey) -> ZoneInfo | None:
    if isinstance(arg, str):
        try:
            return ZoneInfo(arg)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    name = arg if isinstance(arg, str) else ""
    hint = suggest(name, available_timezones()) or "write an IANA time zone such as Asia/Tokyo"
    ctx.error(path, f"unknown time zone {_type_name(arg)}", hint)
    return None


def _hours(arg: object, ctx: CompileContext, path: PathKey) -> tuple[tuple[int, int], ...] | None:
    raw = arg if isinstance(arg, list) else [arg]
    out = []
    for index, item in enumerate(raw):
        where = (*path, index) if isinstance(arg, list) else path
        match = _HOURS.match(item) if isinstance(item, str) else None
        bounds = [int(g) for g in match.groups()] if match else []
        if (
            not bounds
            or bounds[0] > 24
            or bounds[2] > 24
            or bounds[1] > 59
            or bounds[3] > 59
            or bounds[0] * 60 + bounds[1] > 1440
            or bounds[2] * 60 + bounds[3] > 1440
        ):
            ctx.error(where, f"{_type_name(item)} is not a range of hours", "write '08:30-17:15'")
            return None
        start, end = bounds[0] * 60 + bounds[1], bounds[2] * 60 + bounds[3]
        if start == end:
            ctx.error(where, f"'{item}' is an empty range of hours", "its end must differ")
            return None
        out.append((start, end))
    return tuple(out)


def _weekday_index(text: object) -> int | None:
    if not isinstance(text, str):
        return None
    word = text.strip().lower()[:3]
    if word in WEEKDAYS:
        return WEEKDAYS.index(word)
    single = text.strip()[:1]
    return _WEEKDAYS_JA.index(single) if single in _WEEKDAYS_JA else None


def _weekdays(arg: object, ctx: CompileContext, path: PathKey) -> frozenset[int] | None:
    raw = arg if isinstance(arg, list) else [arg]
    days: set[int] = set()
    for index, item in enumerate(raw):
        where = (*path, index) if isinstance(arg, list) else path
        parts = item.split("-") if isinstance(item, str) else [item]
        found = [_weekday_index(part) for part in parts]
        if len(found) not in {1, 2} or None in found:
            hint = "write mon, tue, wed, thu, fri, sat, sun (or 月…日), or a range 'mon-fri'"
            ctx.error(where, f"{_type_name(item)} is not a day of the week", hint)
            return None
        first, last = found[0], found[-1]
        if first is None or last is None:  # already reported above; narrows the type
            return None
        day = first
        days.add(day)
        while day != last:
            day = (day + 1) % 7
            days.add(day)
    return frozenset(days)


def as_date(value: object) -> date | None:
    """A YAML date (or ISO text) as a date; a datetime or anything else is None."""
    if isinstance(value, datetime):
        return None
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value)
        except ValueError:
            return None
    return None


def _dates(arg: object, ctx: CompileContext, path: PathKey) -> tuple[tuple[date, date], ...] | None:
    raw = arg if isinstance(arg, list) else [arg]
    out = []
    for index, item in enumerate(raw):
        where = (*path, index) if isinstance(arg, list) else path
        spec = _mapping(item, ctx, where, ("from", "until"), "dates")
        if spec is None:
            return None
        bounds = []
        for key in ("from", "until"):
            if key not in spec:
                ctx.error(where, f"'dates' needs '{key}:'", "write {from: 2025-04-01, until: …}")
                return None
            found = as_date(spec[key])
            if found is None:
                ctx.error((*where, key), f"{_type_name(spec[key])} is not a date", "YYYY-MM-DD")
                return None
            bounds.append(found)
        if bounds[0] > bounds[1]:
            ctx.error(where, f"'from' {bounds[0]} is after 'until' {bounds[1]}")
            return None
        out.append((bounds[0], bounds[1]))
    return tuple(out)


def _minutes(value: int) -> str:
    return f"{value // 60:02d}:{value % 60:02d}"


@_register("time", "time of day, weekdays, dates and holidays in a time zone (Asia/Tokyo)")
def _time(arg: object, ctx: CompileContext, path: PathKey) -> Criterion | None:
    keys = ("zone", "hours", "weekdays", "dates", "holidays")
    spec = _mapping(arg, ctx, path, keys, "time")
    if spec is None:
        return None
    if not set(spec) - {"zone"}:
        ctx.error(path, "'time' needs at least one of: hours, weekdays, dates, holidays")
        return None
    zone = _zone(spec.get("zone", ctx.zone), ctx, (*path, "zone"))
    hours = _hours(spec["hours"], ctx, (*path, "hours")) if "hours" in spec else ()
    days = _weekdays(spec["weekdays"], ctx, (*path, "weekdays")) if "weekdays" in spec else None
    dates = _dates(spec["dates"], ctx, (*path, "dates")) if "dates" in spec else ()
    holidays = spec.get("holidays")
    if holidays not in {None, "exclude", "only"}:
        ctx.error(
            (*path, "holidays"), f"'holidays' is exclude or only, found {_type_name(holidays)}"
        )
        return None
    if zone is None or hours is None or dates is None or ("weekdays" in spec and days is None):
        return None
    calendar = ctx.holidays
    words = []
    if hours:
        words.append("between " + " or ".join(f"{_minutes(a)}-{_minutes(b)}" for a, b in hours))
    if days is not None:
        words.append("on " + ", ".join(WEEKDAYS[d] for d in sorted(days)))
    if dates:
        words.append("from " + " or ".join(f"{a} to {b}" for a, b in dates))
    if holidays == "exclude":
        words.append("not on a holiday")
    elif holidays == "only":
        words.append("only on holidays")

    def check(f: Facts) -> Reasons:
        local = f.local(zone)
        out: list[Reason] = []
        if hours:
            minute = local.hour * 60 + local.minute
            if not any(
                (a <= minute < b) if a < b else (minute >= a or minute < b) for a, b in hours
            ):
                out.append(Reason.TIME_OUTSIDE_HOURS)
        if days is not None and local.weekday() not in days:
            out.append(Reason.TIME_WEEKDAY_NOT_ALLOWED)
        today = local.date()
        if dates and not any(a <= today <= b for a, b in dates):
            out.append(Reason.TIME_OUTSIDE_DATES)
        if holidays == "exclude" and today in calendar:
            out.append(Reason.TIME_HOLIDAY)
        elif holidays == "only" and today not in calendar:
            out.append(Reason.TIME_NOT_HOLIDAY)
        return tuple(out) if out else _OK

    words_text = f"the time in {zone.key} is " + ", ".join(words)
    return Criterion("time", check, words_text, Reason.TIME_NOT_ALLOWED)


# --- device ---------------------------------------------------------------------------------

DeviceCheck = Callable[[Facts, Posture], Reason | None]


def _posture_checks(  # noqa: PLR0912, PLR0915 — one branch per posture field, on purpose
    arg: object, ctx: CompileContext, path: PathKey
) -> tuple[list[DeviceCheck], list[str]] | None:
    keys = (
        "os",
        "os_version",
        "disk_encrypted",
        "firewall",
        "screen_lock",
        "auto_update",
        "patch_age",
        "agent_version",
        "max_age",
    )
    spec = _mapping(arg, ctx, path, keys, "posture")
    if spec is None:
        return None
    if not spec:
        ctx.error(path, "'posture' needs at least one of: " + ", ".join(keys))
        return None
    checks: list[DeviceCheck] = []
    words: list[str] = []
    ok = True
    unknown = Reason.DEVICE_POSTURE_UNKNOWN

    def flag(name: str, reason: Reason, words_text: str) -> None:
        nonlocal ok
        if not _true_only(name, spec[name], ctx, (*path, name)):
            ok = False
            return

        def check(_f: Facts, p: Posture) -> Reason | None:
            value = getattr(p, name)
            return unknown if value is None else None if value else reason

        checks.append(check)
        words.append(words_text)

    if "os" in spec:
        texts = _texts(spec["os"], ctx, (*path, "os"))
        if texts is None:
            ok = False
        else:
            systems = frozenset(text.casefold() for text, _ in texts)

            def check_os(_f: Facts, p: Posture) -> Reason | None:
                if p.os is None:
                    return unknown
                return None if p.os.casefold() in systems else Reason.DEVICE_OS_NOT_ALLOWED

            checks.append(check_os)
            words.append(f"runs {_words(spec['os'])}")
    if "os_version" in spec:
        raw = spec["os_version"]
        minimums: dict[str | None, tuple[int, ...]] = {}
        if isinstance(raw, dict):
            for system, value in raw.items():
                found = _min_version(value, ctx, (*path, "os_version", system))
                if found is None:
                    ok = False
                else:
                    minimums[str(system).casefold()] = found
        else:
            found = _min_version(raw, ctx, (*path, "os_version"))
            if found is None:
                ok = False
            else:
                minimums[None] = found

        def check_os_version(_f: Facts, p: Posture) -> Reason | None:
            if p.os_version is None or (None not in minimums and p.os is None):
                return unknown
            least = minimums.get(None) or minimums.get(p.os.casefold() if p.os else "")
            if least is None:
                return Reason.DEVICE_OS_NOT_ALLOWED
            have = _fact_version(p.os_version)
            if have is None:
                return unknown
            return None if have >= least else Reason.DEVICE_OS_OUTDATED

        checks.append(check_os_version)
        shown = ", ".join(
            f"{system + ' ' if system else ''}{'.'.join(map(str, v))}"
            for system, v in minimums.items()
        )
        words.append(f"has OS version at least {shown}")
    if "disk_encrypted" in spec:
        flag("disk_encrypted", Reason.DEVICE_DISK_UNENCRYPTED, "has an encrypted disk")
    if "firewall" in spec:
        flag("firewall", Reason.DEVICE_FIREWALL_OFF, "has its firewall on")
    if "auto_update" in spec:
        flag("auto_update", Reason.DEVICE_AUTO_UPDATE_OFF, "updates automatically")
    if "screen_lock" in spec:
        most = _duration(spec["screen_lock"], ctx, (*path, "screen_lock"))
        if most is None:
            ok = False
        else:

            def check_lock(_f: Facts, p: Posture, most: int = most) -> Reason | None:
                if p.screen_lock_timeout is None:
                    return unknown
                good = 0 < p.screen_lock_timeout <= most
                return None if good else Reason.DEVICE_SCREEN_LOCK_TOO_LONG

            checks.append(check_lock)
            words.append(f"locks its screen within {spec['screen_lock']}")
    if "patch_age" in spec:
        oldest = _duration(spec["patch_age"], ctx, (*path, "patch_age"))
        if oldest is None:
            ok = False
        else:

            def check_patch(_f: Facts, p: Posture, oldest: int = oldest) -> Reason | None:
                if p.patch_age_days is None:
                    return unknown
                fresh = p.patch_age_days * 86400 <= oldest
                return None if fresh else Reason.DEVICE_PATCHES_OUTDATED

            checks.append(check_patch)
            words.append(f"installed updates within {spec['patch_age']}")
    if "agent_version" in spec:
        least_agent = _min_version(spec["agent_version"], ctx, (*path, "agent_version"))
        if least_agent is None:
            ok = False
        else:

            def check_agent(
                _f: Facts, p: Posture, least: tuple[int, ...] = least_agent
            ) -> Reason | None:
                have = _fact_version(p.agent_version) if p.agent_version else None
                if have is None:
                    return unknown
                return None if have >= least else Reason.DEVICE_AGENT_OUTDATED

            checks.append(check_agent)
            words.append(f"runs agent version at least {'.'.join(map(str, least_agent))}")
    if "max_age" in spec:
        age = _duration(spec["max_age"], ctx, (*path, "max_age"))
        if age is None:
            ok = False
        else:
            limit, skew = timedelta(seconds=age), timedelta(minutes=5)

            def check_age(f: Facts, p: Posture) -> Reason | None:
                at = p.reported_at
                if at is None or at.tzinfo is None:
                    return unknown
                elapsed = f.now - at
                fresh = -skew <= elapsed <= limit
                return None if fresh else Reason.DEVICE_POSTURE_STALE

            checks.append(check_age)
            words.append(f"reported its posture within the last {spec['max_age']}")
    return (checks, words) if ok else None


@_register("device", "the device: enrolled, approved, id, tags, owner, key storage, posture")
def _device(  # noqa: PLR0912, PLR0915 — one branch per device field, on purpose
    arg: object, ctx: CompileContext, path: PathKey
) -> Criterion | None:
    keys = ("enrolled", "approved", "id", "tags", "owned_by_user", "key_storage", "posture")
    spec = _mapping(arg, ctx, path, keys, "device")
    if spec is None:
        return None
    if not spec:
        ctx.error(path, "'device' needs at least one of: " + ", ".join(keys))
        return None
    ok = True
    for name in ("enrolled", "approved", "owned_by_user"):
        if name in spec and not _true_only(name, spec[name], ctx, (*path, name)):
            ok = False
    sets: dict[str, frozenset[str]] = {}
    for name in ("id", "tags", "key_storage"):
        if name in spec:
            texts = _texts(spec[name], ctx, (*path, name))
            if texts is None:
                ok = False
            else:
                sets[name] = frozenset(text for text, _ in texts)
    posture = (
        _posture_checks(spec["posture"], ctx, (*path, "posture")) if "posture" in spec else None
    )
    if not ok or ("posture" in spec and posture is None):
        return None
    approved = "approved" in spec
    owned = "owned_by_user" in spec
    ids, tags, stores = sets.get("id"), sets.get("tags"), sets.get("key_storage")
    posture_checks = tuple(posture[0]) if posture else ()
    unenrolled = _one(Reason.DEVICE_UNENROLLED)
    revoked = _one(Reason.DEVICE_REVOKED)
    no_posture = Reason.DEVICE_POSTURE_UNKNOWN

    def check(f: Facts) -> Reasons:  # noqa: PLR0912 — one branch per field, on purpose
        device = f.request.device
        if device is not None and device.revoked:
            return revoked
        if device is None or not device.enrolled:
            return unenrolled
        out: list[Reason] = []
        if approved and not device.approved:
            out.append(Reason.DEVICE_NOT_APPROVED)
        if ids is not None and device.id not in ids:
            out.append(Reason.DEVICE_NOT_ALLOWED)
        if tags is not None and tags.isdisjoint(device.tags):
            out.append(Reason.DEVICE_TAG_MISSING)
        if stores is not None and device.key_storage not in stores:
            out.append(Reason.DEVICE_KEY_STORAGE_WEAK)
        if owned:
            subject = f.request.subject
            if subject is None:
                out.append(Reason.USER_UNAUTHENTICATED)
            else:
                owners = {subject.subject.casefold()}
                if subject.email and subject.email_verified:
                    owners.add(subject.email.casefold())
                if device.owner is None or device.owner.casefold() not in owners:
                    out.append(Reason.DEVICE_NOT_OWNED)
        if posture_checks:
            report = device.posture
            if report is None:
                out.append(no_posture)
            else:
                for posture_check in posture_checks:
                    reason = posture_check(f, report)
                    if reason is not None:
                        out.append(reason)
        return tuple(out) if out else _OK

    words = []
    if approved:
        words.append("is approved by IT")
    if ids is not None:
        words.append(f"is device {_words(spec['id'])}")
    if tags is not None:
        words.append(f"is tagged {_words(spec['tags'])}")
    if stores is not None:
        words.append(f"keeps its key in {_words(spec['key_storage'])}")
    if owned:
        words.append("belongs to the user")
    if posture:
        words.extend(posture[1])
    text = "the device is enrolled" + ("" if not words else ", " + ", ".join(words))
    return Criterion("device", check, text, Reason.DEVICE_DENIED)


# --- certificates and travel ---------------------------------------------------------------------

_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


def normalise_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint as 64 lowercase hex digits (colons and spaces dropped)."""
    return text.replace(":", "").replace(" ", "").lower()


@_register("client_certificate", "a verified client certificate: any, or by fingerprint or SAN")
def _client_certificate(  # noqa: PLR0911 — each malformed part is reported, then given up
    arg: object, ctx: CompileContext, path: PathKey
) -> Criterion | None:
    fingerprints: frozenset[str] | None = None
    san: Matcher | None = None
    if isinstance(arg, dict):
        spec = _mapping(arg, ctx, path, ("fingerprint", "san"), "client_certificate")
        if spec is None:
            return None
        if not spec:
            ctx.error(path, "'client_certificate' needs 'fingerprint:' or 'san:'")
            return None
        if "fingerprint" in spec:
            texts = _texts(spec["fingerprint"], ctx, (*path, "fingerprint"))
            if texts is None:
                return None
            for text, where in texts:
                if not _FINGERPRINT.match(normalise_fingerprint(text)):
                    hint = "write the 64 hex digits of its SHA-256 fingerprint"
                    ctx.error(where, f"'{text}' is not a SHA-256 fingerprint", hint)
                    return None
            fingerprints = frozenset(normalise_fingerprint(text) for text, _ in texts)
        if "san" in spec:
            san = _matcher(spec["san"], ctx, (*path, "san"), fold=True, what="san")
            if san is None:
                return None
    elif not _true_only("client_certificate", arg, ctx, path):
        return None
    missing = _one(Reason.CLIENT_CERTIFICATE_MISSING)
    fail = _one(Reason.CLIENT_CERTIFICATE_NOT_ALLOWED)

    def check(f: Facts) -> Reasons:
        cert = f.request.client_certificate
        if cert is None:
            return missing
        if fingerprints is not None and normalise_fingerprint(cert.fingerprint_sha256) not in (
            fingerprints
        ):
            return fail
        if san is not None and not san.any_of(s.casefold() for s in cert.san):
            return fail
        return _OK

    words = "the client presented a verified certificate"
    if fingerprints is not None:
        words += " with an allowed fingerprint"
    if san is not None:
        words += f" whose SAN {san.words}"
    return Criterion("client_certificate", check, words, Reason.CLIENT_CERTIFICATE_DENIED)


@_register("travel_window", "IT approved a trip for this user covering today and this country")
def _travel_window(arg: object, ctx: CompileContext, path: PathKey) -> Criterion | None:
    if not _true_only("travel_window", arg, ctx, path):
        return None
    windows = ctx.travel_windows
    zone = ZoneInfo(ctx.zone)
    none = _one(Reason.TRAVEL_WINDOW_NONE)
    wrong = _one(Reason.TRAVEL_WINDOW_WRONG_COUNTRY)
    country_unknown = _one(Reason.COUNTRY_UNKNOWN)

    def check(f: Facts) -> Reasons:
        subject = f.request.subject
        if subject is None:
            return _UNAUTH
        if not windows:  # no trip approved for anyone: nothing to look up
            return none
        mine = windows.get(subject.subject.casefold(), ())
        if subject.email and subject.email_verified:
            mine += windows.get(subject.email.casefold(), ())
        today = f.local(zone).date()
        active = [w for w in mine if w.start <= today <= w.end]
        if not active:
            return none
        country = f.request.country
        if not country:
            return country_unknown
        return _OK if any(country.upper() in w.countries for w in active) else wrong

    words = "IT has approved a trip for the user that covers today and this country"
    return Criterion("travel_window", check, words, Reason.TRAVEL_WINDOW_DENIED)
