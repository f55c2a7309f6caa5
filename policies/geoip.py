"""Country of an IP address from a MaxMind-format (mmdb) database, for the `country` fact.

Used by the gateway to fill `AccessRequest.country`; not part of the pure core (it reads a file
through the `maxminddb` reader, the one module that imports it).
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import maxminddb


class GeoIP:
    """An open mmdb database (GeoLite2-Country / GeoIP2-Country layout or compatible)."""

    def __init__(self, path: Path) -> None:
        self._reader = maxminddb.open_database(str(path))

    def country(self, address: str | None) -> str | None:
        """The ISO 3166-1 alpha-2 code for `address`, or None when unknown or malformed."""
        if not address:
            return None
        try:
            record = self._reader.get(address)
        except ValueError:  # not an IP address, or IPv6 in an IPv4-only database
            return None
        if not isinstance(record, dict):
            return None
        for key in ("country", "registered_country"):
            place = record.get(key)
            code = place.get("iso_code") if isinstance(place, dict) else None
            if isinstance(code, str) and len(code) == 2:
                return code.upper()
        return None

    def close(self) -> None:
        """Release the database file."""
        self._reader.close()

    def __enter__(self) -> GeoIP:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()
