"""The return-to address after login: only a path on the same host, never another origin.

Pure functions on the standard library only; imports nothing from the gateway.
"""

from __future__ import annotations

import unicodedata
from urllib.parse import unquote

MAX_LENGTH = 2048
DEFAULT_PATH = "/"
# Raw (as sent) characters a path may hold: RFC 3986 pchar plus "/", "?", "#", "%". Anything else
# (spaces, quotes, angle brackets, backslashes, non-ASCII) is refused outright.
_RAW_ALLOWED = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    "-._~"  # unreserved
    "!$&'()*+,;="  # sub-delims
    ":@/?#%"
)
# Unicode categories refused in the decoded forms: controls, format characters (zero-width,
# bidi overrides), and every separator. Browsers strip tab/LF/CR anywhere in a URL and leading
# C0/space (WHATWG URL §4.4), so "/\t/evil" would become "//evil" — a host, not a path.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})
_DECODE_ROUNDS = 3


def _is_same_host_path(value: str) -> bool:
    """One form of the value is an absolute path on this host and nothing a browser reads as a
    host: "/" first and not "//" or "/\\" (WHATWG URL treats "\\" as "/" for special schemes,
    so a "\\" anywhere is refused), no control or space characters, no dot segments."""
    if not value.startswith("/") or value[1:2] in ("/", "\\"):
        return False
    if "\\" in value:
        return False
    for char in value:
        # A plain space inside a decoded path is a file name ("My%20Doc.pdf"), not a trick: the
        # raw form cannot hold one, and browsers strip only leading/trailing spaces.
        if char != " " and unicodedata.category(char) in _REFUSED_CATEGORIES:
            return False
    path = value.split("?", 1)[0].split("#", 1)[0]
    # Dot segments are resolved by the browser against the path (RFC 3986 §5.2.4): never
    # needed in a genuine return address, and a way to reach other prefixes on the host.
    return all(segment not in (".", "..") for segment in path.split("/"))


def safe_return_path(raw: str | None, default: str = DEFAULT_PATH) -> str:
    """`raw` when it is a plain same-host path (checked as sent and after every round of
    percent-decoding, up to three, until stable); otherwise `default`.

    Refuses "//evil.example", "/\\evil.example", "https:evil.example", "/%2F%2Fevil.example",
    "/%5Cevil.example", "/\\t/evil", "javascript:…" and anything longer than 2048 characters.
    """
    if not raw or len(raw) > MAX_LENGTH:
        return default
    if not all(char in _RAW_ALLOWED for char in raw):
        return default
    value = raw
    for _ in range(_DECODE_ROUNDS + 1):
        if not _is_same_host_path(value):
            return default
        decoded = _unquote_or_none(value) if "%" in value else value
        if decoded is None:  # percent-encoded bytes that are not UTF-8: refuse, don't guess
            return default
        if decoded == value:
            return raw
        value = decoded
    # Still changing after three rounds of decoding: nobody sends that by accident.
    return default


def _unquote_or_none(value: str) -> str | None:
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError:
        return None
