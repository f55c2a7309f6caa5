"""A tiny MaxMind DB (mmdb, format 2.0) writer for tests: IPv4 networks to records.

Follows the published MaxMind DB File Format Specification: a binary search tree of 24-bit
records, 16 zero bytes, the data section, then the metadata after b"\\xab\\xcd\\xefMaxMind.com".
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

_UTF8, _DOUBLE, _MAP, _UINT16, _UINT32 = 2, 3, 7, 5, 6
_UINT64, _ARRAY, _BOOLEAN = 9, 11, 14


@dataclass(frozen=True, slots=True)
class Typed:
    """An unsigned integer with the mmdb type to encode it as (uint16, uint32 or uint64)."""

    kind: int
    value: int


def _control(kind: int, size: int) -> bytes:
    if size < 29:
        first, extra = size, b""
    elif size < 285:
        first, extra = 29, bytes([size - 29])
    else:
        first, extra = 30, (size - 285).to_bytes(2, "big")
    if kind <= 7:
        return bytes([(kind << 5) | first]) + extra
    return bytes([first, kind - 7]) + extra


def encode(value: object) -> bytes:
    """One value in the mmdb data-section encoding."""
    if isinstance(value, Typed):
        raw = value.value.to_bytes((value.value.bit_length() + 7) // 8, "big")
        return _control(value.kind, len(raw)) + raw
    if isinstance(value, bool):
        return _control(_BOOLEAN, int(value))
    if isinstance(value, int):
        return encode(Typed(_UINT32, value))
    if isinstance(value, str):
        raw = value.encode()
        return _control(_UTF8, len(raw)) + raw
    if isinstance(value, dict):
        return _control(_MAP, len(value)) + b"".join(
            encode(k) + encode(v) for k, v in value.items()
        )
    if isinstance(value, list):
        return _control(_ARRAY, len(value)) + b"".join(encode(v) for v in value)
    raise TypeError(f"cannot encode {value!r}")


@dataclass(eq=False)
class _Node:
    children: list[object] = field(default_factory=lambda: [None, None])


def write_mmdb(path: Path, networks: dict[str, dict[str, object]]) -> None:
    """Write an IPv4 mmdb at `path` mapping each CIDR of `networks` to its record."""
    root = _Node()
    data = bytearray()
    for cidr, record in networks.items():
        network = ipaddress.IPv4Network(cidr)
        offset = len(data)
        data += encode(record)
        bits, node = int(network.network_address), root
        for depth in range(network.prefixlen):
            bit = (bits >> (31 - depth)) & 1
            if depth == network.prefixlen - 1:
                node.children[bit] = ("data", offset)
            else:
                child = node.children[bit]
                if not isinstance(child, _Node):
                    child = node.children[bit] = _Node()
                node = child
    order: list[_Node] = []
    queue = [root]
    while queue:
        node = queue.pop(0)
        order.append(node)
        queue.extend(c for c in node.children if isinstance(c, _Node))
    index = {id(node): number for number, node in enumerate(order)}
    count = len(order)
    tree = bytearray()
    for node in order:
        for child in node.children:
            if child is None:
                value = count
            elif isinstance(child, _Node):
                value = index[id(child)]
            else:
                assert isinstance(child, tuple)
                value = count + 16 + child[1]
            tree += value.to_bytes(3, "big")
    metadata = {
        "node_count": Typed(_UINT32, count),
        "record_size": Typed(_UINT16, 24),
        "ip_version": Typed(_UINT16, 4),
        "database_type": "Tabiji-Test-Country",
        "languages": ["en"],
        "binary_format_major_version": Typed(_UINT16, 2),
        "binary_format_minor_version": Typed(_UINT16, 0),
        "build_epoch": Typed(_UINT64, 1_700_000_000),
        "description": {"en": "test"},
    }
    blob = bytes(tree) + bytes(16) + bytes(data) + b"\xab\xcd\xefMaxMind.com" + encode(metadata)
    path.write_bytes(blob)
