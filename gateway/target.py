"""Request-target normalisation: one canonical path used for routing, policy and forwarding alike.

Pure and allocation-light (it runs on every request). Must not import gateway.settings, gateway.app
or gateway.cli.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.errors import BadRequestTarget
from gateway.routing import canonical_authority


@dataclass(frozen=True, slots=True)
class Target:
    """A normalised request-target.

    `path` keeps percent-encoding for every byte that is not unreserved (RFC 3986 §2.3), with
    upper-case hex; `query` is the raw query string without "?"; `authority` is set only for an
    absolute-form target (RFC 9112 §3.2.2), lower-cased.
    """

    path: str
    query: str
    authority: str | None = None


# RFC 3986 §2.3 unreserved characters: the only escapes that are decoded.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# RFC 3986 §3.3 pchar (minus "%", handled separately, and minus ";", refused — see below) plus "/".
_PATH_OK = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,=:@/"
# Any byte a request line may not carry raw: controls, space, DEL, non-ASCII (RFC 9112 §3.2), "#"
# (a fragment is never part of a request-target, RFC 9112 §3.2) and "\" (RFC 3986 has no "\").
_BAD_ANYWHERE = re.compile(rb"[\x00-\x20\x7f-\xff#]")
# The common case in one match: an origin-form path of plain pchar bytes and an ASCII query.
_FAST = re.compile(rb"(/[A-Za-z0-9\-._~!$&'()*+,=:@/]*)(?:\?([\x21\x22\x24-\x7e]*))?")
_PCT = re.compile(rb"%([0-9A-Fa-f]{2})?")
_SLASHES = re.compile(rb"//+")
_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)")
_AUTHORITY = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*\.?"
    r"|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?"
)


def _reject_bad_byte(raw: bytes, match: re.Match[bytes]) -> BadRequestTarget:
    byte = raw[match.start()]
    if byte >= 0x80:
        # RFC 9112 §3.2 / RFC 3986 §2: a request-target is ASCII; other octets must be escaped.
        return BadRequestTarget("non-ASCII byte in the request-target", code="target-non-ascii")
    if byte == 0x23:
        return BadRequestTarget("fragment in the request-target", code="target-fragment")
    # RFC 9112 §2.2: bare CR/LF/NUL and other controls make the message ambiguous.
    return BadRequestTarget(
        "control character in the request-target", code="target-control-character"
    )


def _decode_escape(match: re.Match[bytes]) -> bytes:
    hexpair = match.group(1)
    if hexpair is None:
        # RFC 3986 §2.1: "%" must be followed by two hex digits; anything else is ambiguous.
        raise BadRequestTarget("invalid percent-encoding", code="target-invalid-percent")
    value = int(hexpair, 16)
    if value == 0x2F:
        # An encoded "/" is a segment separator to some upstreams and data to others (RFC 3986
        # §2.2): routing and policy could disagree with the upstream, so it is refused.
        raise BadRequestTarget("encoded '/' in the path", code="target-encoded-slash")
    if value == 0x5C:
        # "\" is a separator on Windows/IIS-style upstreams: same ambiguity as %2F.
        raise BadRequestTarget("encoded '\\' in the path", code="target-encoded-backslash")
    if value == 0:
        # NUL truncates paths in C-based upstreams (CWE-158).
        raise BadRequestTarget("encoded NUL in the path", code="target-nul")
    if value < 0x20 or value == 0x7F:
        # Encoded CR/LF and other controls lead to header/log injection once an upstream decodes.
        raise BadRequestTarget(
            "encoded control character in the path", code="target-control-character"
        )
    if value in _UNRESERVED:
        # RFC 3986 §6.2.2.2: decode percent-encoded unreserved characters.
        return bytes((value,))
    # RFC 3986 §6.2.2.1: upper-case hex in the escapes that stay.
    return b"%" + hexpair.upper()


def _encode_stray(path: bytes) -> bytes:
    """Percent-encode printable ASCII that RFC 3986 does not allow raw in a path (e.g. `|`, `{`)."""
    out = bytearray()
    for byte in path:
        if byte == 0x25 or byte in _PATH_OK_SET:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


_PATH_OK_SET = frozenset(_PATH_OK)
_PATH_OK_PCT = _PATH_OK + b"%"


def _remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 §5.2.4 for an absolute path that has no empty segments (repeated "/" collapsed)."""
    output: list[bytes] = []
    segments = path.split(b"/")[1:]
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if segment == b".":
            if index == last:
                output.append(b"")
        elif segment == b"..":
            if output:
                output.pop()
            if index == last:
                output.append(b"")
        else:
            output.append(segment)
    return b"/" + b"/".join(output)


def _check_path_parameters(path: bytes) -> None:
    # Servlet containers (Tomcat, Jetty) strip ";params" from every segment before mapping, so
    # "/public/..;/admin" reaches "/admin" upstream while we would route and authorise "/public".
    # A path parameter also hides a segment from prefix matching ("/admin;x" is not under
    # "/admin" here but is "/admin" upstream), so every raw ";" in the path is refused
    # (RFC 3986 §3.3 leaves ";" semantics to the origin: the gateway cannot know them).
    for segment in path.split(b"/"):
        if b";" in segment:
            name = _PCT.sub(_decode_escape, segment.split(b";", 1)[0])
            if name in (b".", b".."):
                raise BadRequestTarget(
                    "dot-segment with path parameters", code="target-path-parameter-dots"
                )
            raise BadRequestTarget("path parameter (';') in the path", code="target-path-parameter")


def normalise_target(raw: bytes) -> Target:
    """Normalise a raw request-target (origin-form or absolute-form) or raise BadRequestTarget.

    Unreserved escapes are decoded, other escapes upper-cased, repeated "/" collapsed and
    dot-segments resolved after decoding; the query is kept as sent. Paths stay case-sensitive.
    """
    fast = _FAST.fullmatch(raw)
    if fast is not None:
        path = fast.group(1)
        if b"/." not in path and b"//" not in path:
            query = fast.group(2)
            return Target(path.decode("ascii"), query.decode("ascii") if query else "")

    bad = _BAD_ANYWHERE.search(raw)
    if bad is not None:
        raise _reject_bad_byte(raw, bad)

    authority: str | None = None
    if raw[:1] != b"/":
        raw, authority = _split_absolute_form(raw)

    path, _, query = raw.partition(b"?")
    if not path:
        path = b"/"
    return Target(_normalise_path(path).decode("ascii"), query.decode("ascii"), authority)


def _normalise_path(path: bytes) -> bytes:
    if b"\\" in path:
        # Windows-style upstreams treat "\" as "/": "/public\..\admin" (CVE-2019-0211-style).
        raise BadRequestTarget("'\\' in the path", code="target-backslash")
    if b";" in path:
        _check_path_parameters(path)
    if b"%" in path:
        path = _PCT.sub(_decode_escape, path)
    if path.translate(None, _PATH_OK_PCT):
        path = _encode_stray(path)
    if b"//" in path:
        # Repeated "/" collapsed before dot-segments are resolved (as nginx merge_slashes does),
        # so "//admin" and "/admin" route, authorise and forward alike.
        path = _SLASHES.sub(b"/", path)
    if b"/." in path:
        # RFC 3986 §5.2.4, after decoding unreserved escapes so "%2e%2e" counts as "..".
        path = _remove_dot_segments(path)
    return path


def _split_absolute_form(raw: bytes) -> tuple[bytes, str]:
    if raw == b"*":
        # RFC 9112 §3.2.4 asterisk-form (OPTIONS *) concerns the gateway itself: never forwarded.
        raise BadRequestTarget("asterisk-form request-target", code="target-not-origin-form")
    match = _ABSOLUTE.match(raw)
    if match is None or match.group(1).lower() not in (b"http", b"https"):
        # RFC 9112 §3.2.3 authority-form (CONNECT) and other schemes: the gateway is no tunnel.
        raise BadRequestTarget(
            "request-target is neither origin-form nor http(s) absolute-form",
            code="target-not-origin-form",
        )
    scheme = match.group(1).decode("ascii").lower()
    authority = match.group(2).decode("ascii").lower()
    if "@" in authority:
        # RFC 9110 §4.2.4: userinfo in an http(s) URI is deprecated and treated as an error.
        raise BadRequestTarget("userinfo in the request-target", code="target-userinfo")
    if _AUTHORITY.fullmatch(authority) is None:
        raise BadRequestTarget("invalid authority in the request-target", code="target-authority")
    return raw[match.end() :], canonical_authority(authority, scheme)
