"""GeoIP lookups against a tiny mmdb the test writes itself, feeding the `country` criterion."""

from __future__ import annotations

from pathlib import Path

import pytest
from mmdb_writer import write_mmdb
from policy_helpers import decide, make_request

from policies.geoip import GeoIP


@pytest.fixture
def geoip(tmp_path: Path) -> GeoIP:
    """A database with 192.0.2.0/24 in Japan and 203.0.113.0/24 in the United States."""
    path = tmp_path / "country.mmdb"
    write_mmdb(
        path,
        {
            "192.0.2.0/24": {"country": {"iso_code": "JP", "names": {"en": "Japan"}}},
            "203.0.113.0/24": {"country": {"iso_code": "US"}},
            "198.51.100.0/25": {"registered_country": {"iso_code": "DE"}},
        },
    )
    return GeoIP(path)


def test_known_addresses_have_their_country(geoip: GeoIP) -> None:
    """Addresses inside a network of the database resolve to its ISO country code."""
    with geoip:
        assert geoip.country("192.0.2.77") == "JP"
        assert geoip.country("203.0.113.1") == "US"
        assert geoip.country("198.51.100.3") == "DE"


def test_unknown_and_malformed_addresses_have_none(geoip: GeoIP) -> None:
    """Addresses outside the database, malformed text, IPv6 and None all give None."""
    with geoip:
        assert geoip.country("10.1.2.3") is None
        assert geoip.country("not-an-ip") is None
        assert geoip.country("2001:db8::1") is None
        assert geoip.country(None) is None


def test_country_criterion_uses_the_looked_up_fact(geoip: GeoIP) -> None:
    """The country the database gives decides a `country: [JP]` policy."""
    policy = "policies:\n  - name: jp\n    allow: {country: [JP]}\n"
    with geoip:
        inside = make_request(source_ip="192.0.2.9", country=geoip.country("192.0.2.9"))
        outside = make_request(source_ip="203.0.113.9", country=geoip.country("203.0.113.9"))
        nowhere = make_request(source_ip="10.0.0.1", country=geoip.country("10.0.0.1"))
    assert decide(policy, "jp", inside).allowed
    assert decide(policy, "jp", outside).reasons == ("country-not-allowed", "no-rule-matched")
    assert decide(policy, "jp", nowhere).reasons == ("country-unknown", "no-rule-matched")
