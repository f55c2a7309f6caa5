"""The message catalogue: every reason and gateway code has Japanese and English text; no extras."""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

import gateway
from gateway.web.catalogue import Catalogue, load_catalogue
from policies.reasons import ALL_REASONS

GATEWAY_PACKAGE = Path(gateway.__file__).parent
CODE = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)+$")  # a stable kebab-case code
# Hiragana, katakana and kanji: what makes a text Japanese.
JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]")
# In English text also Japanese punctuation and full-width forms (「」、。（）), a copy-paste slip.
NOT_ENGLISH = re.compile(r"[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]")
# The link to the other language is written in the language it switches to, on purpose.
OTHER_LANGUAGE_LINK = "ui.other-language"
FIELDS = ("title", "explain", "fix")


def _codes_in(node: ast.AST) -> set[str]:
    return {
        n.value
        for n in ast.walk(node)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and CODE.match(n.value)
    }


# Errors whose first argument is the code a page shows (a refused token, a failed login).
CODED_BY_FIRST_ARGUMENT = frozenset({"TokenInvalid", "IdentityRejected", "OidcError"})


def _assigned_code(node: ast.AST) -> ast.expr | None:
    """The value of `code = …` or `reasons = …` (an error class's attribute, or a local)."""
    if isinstance(node, ast.Assign):
        targets, value = node.targets, node.value
    elif isinstance(node, ast.AnnAssign) and node.value is not None:
        targets, value = [node.target], node.value
    else:
        return None
    for target in targets:
        name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", None)
        if name in ("code", "reasons"):
            return value
    return None


def _first_argument_code(node: ast.Call) -> set[str]:
    func = node.func
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    if name in CODED_BY_FIRST_ARGUMENT and node.args and isinstance(node.args[0], ast.Constant):
        return _codes_in(node.args[0])
    return set()


@cache
def gateway_codes() -> frozenset[str]:
    """Every error or reason code the gateway itself can put on a page, read from its source.

    The codes are string literals where they are raised (`code = "…"` on an error class,
    `BadRequestTarget(…, code="…")`, `AccessDenied(("…",))`, `reasons=("…",)`), not constants to
    import, so this walks the syntax tree of every module under gateway/: a new code anywhere
    fails `test_every_gateway_code_has_a_message` until the catalogue has its text.
    """
    found: set[str] = set()
    for path in sorted(GATEWAY_PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            value = _assigned_code(node)
            if value is not None:
                found |= _codes_in(value)
            elif isinstance(node, ast.Call):
                found |= _first_argument_code(node)
                for keyword in node.keywords:
                    if keyword.arg in ("code", "reasons"):
                        found |= _codes_in(keyword.value)
                for arg in node.args:  # a literal tuple of codes: reasons passed positionally
                    if (
                        isinstance(arg, ast.Tuple)
                        and arg.elts
                        and len(_codes_in(arg)) == len(arg.elts)
                    ):
                        found |= _codes_in(arg)
    return frozenset(found)


REASON_CODES = tuple(reason.value for reason in ALL_REASONS)


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return load_catalogue()


def _texts(catalogue: Catalogue, message_id: str, language: str) -> dict[str, str]:
    message = catalogue.get(message_id, language)
    return {field: getattr(message, field) for field in FIELDS}


def test_catalogue_loads(catalogue: Catalogue) -> None:
    """The shipped catalogue loads without errors and has the generic fallback."""
    assert "gateway-error" in catalogue
    assert len(catalogue.ids()) >= len(REASON_CODES)


@pytest.mark.parametrize("code", REASON_CODES)
def test_every_reason_has_a_message(catalogue: Catalogue, code: str) -> None:
    """Each policy reason code has a title, an explanation and a fix in Japanese and English."""
    assert code in catalogue, f"add '{code}' to gateway/web/messages.yaml"
    for language in ("ja", "en"):
        empty = [f for f, text in _texts(catalogue, code, language).items() if not text.strip()]
        assert not empty, f"'{code}.{language}' needs: {', '.join(empty)}"


def test_the_source_scan_finds_the_known_gateway_codes() -> None:
    """The scan of gateway/ finds codes of every kind, so an empty scan cannot pass silently."""
    expected = {
        "gateway-error",  # an error class's `code`
        "upstream-timeout",
        "target-encoded-slash",  # BadRequestTarget(code=…) in gateway/target.py
        "host-missing",  # … in gateway/peer.py
        "target-authority-mismatch",  # … in gateway/pipeline.py
        "websocket-not-allowed",  # AccessDenied((…,)) in gateway/pipeline.py
        "route-not-public",  # a reason the gateway gives itself
        "method-not-allowed",  # the gateway's own 405 page
    }
    assert expected <= gateway_codes()


@pytest.mark.parametrize("code", sorted(gateway_codes()))
def test_every_gateway_code_has_a_message(catalogue: Catalogue, code: str) -> None:
    """Each code the gateway raises or gives has its own entry, complete in both languages."""
    assert code in catalogue, f"add '{code}' to gateway/web/messages.yaml"
    for language in ("ja", "en"):
        empty = [f for f, text in _texts(catalogue, code, language).items() if not text.strip()]
        assert not empty, f"'{code}.{language}' needs: {', '.join(empty)}"


def test_no_entry_is_for_a_code_nobody_uses(catalogue: Catalogue) -> None:
    """Every id is a reason code, a gateway code or a `ui.*` label; stale or misspelt ids fail."""
    known = set(REASON_CODES) | gateway_codes()
    # ui.* labels and audit.* view texts (their own test, tests/gateway/test_audit_view.py).
    labels = ("ui.", "audit.")
    stray = sorted(i for i in catalogue.ids() if i not in known and not i.startswith(labels))
    assert not stray, f"no code uses these catalogue ids (misspelt or stale?): {stray}"


def test_japanese_text_is_japanese(catalogue: Catalogue) -> None:
    """Every non-empty Japanese text contains kana or kanji (not an English copy)."""
    wrong = [
        f"{message_id}.ja.{field}"
        for message_id in sorted(catalogue.ids() - {OTHER_LANGUAGE_LINK})
        for field, text in _texts(catalogue, message_id, "ja").items()
        if text and not JAPANESE.search(text)
    ]
    assert not wrong, f"not Japanese: {wrong}"


def test_english_text_has_no_japanese(catalogue: Catalogue) -> None:
    """No English text contains Japanese characters or full-width punctuation."""
    wrong = [
        f"{message_id}.en.{field}"
        for message_id in sorted(catalogue.ids() - {OTHER_LANGUAGE_LINK})
        for field, text in _texts(catalogue, message_id, "en").items()
        if NOT_ENGLISH.search(text)
    ]
    assert not wrong, f"Japanese in English text: {wrong}"


def test_japanese_titles_are_short(catalogue: Catalogue) -> None:
    """Japanese titles stay within 40 characters, so the page heading reads at a glance."""
    long = [i for i in sorted(catalogue.ids()) if len(catalogue.get(i, "ja").title) > 40]
    assert not long, f"shorten the Japanese title of: {long}"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("target-something-new", "target-invalid"),
        ("host-something-new", "target-invalid"),
        ("upstream-something-new", "upstream-unavailable"),
        ("no-such-code", "gateway-error"),
    ],
)
def test_unknown_code_falls_back_to_its_family(
    catalogue: Catalogue, code: str, expected: str
) -> None:
    """A code without an entry reads as its family's default, else as the generic gateway error."""
    for language in ("ja", "en"):
        assert catalogue.get(code, language) == catalogue.get(expected, language)


def test_a_code_with_its_own_entry_does_not_fall_back(catalogue: Catalogue) -> None:
    """A specific code's own text wins over its family's default."""
    assert "%00" in catalogue.get("target-nul", "en").explain
    assert catalogue.get("target-nul", "en") != catalogue.get("target-invalid", "en")
