"""Config loading: every error with file:line:column and a hint; env overrides; safe defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import GatewaySettings, load_settings
from policies.yaml_source import SourceErrors

VALID = """\
listen: {host: 127.0.0.1, port: 8080}
public_url: https://gateway.town.example/
routes:
  - name: groupware
    from: https://groupware.town.example/app/
    to: http://127.0.0.1:9001/base
    public: true
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def errors_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(SourceErrors) as caught:
        load_settings(write(tmp_path, text))
    return [str(error) for error in caught.value.errors]


def test_valid_config_loads_with_defaults(tmp_path: Path) -> None:
    """A minimal valid file loads, with the documented defaults filled in."""
    settings = load_settings(write(tmp_path, VALID))
    assert settings.public_url == "https://gateway.town.example"
    assert settings.server.max_head_bytes == 16 * 1024
    assert settings.server.head_timeout == 5.0
    assert settings.trusted_proxies == []
    route = settings.routes[0]
    assert route.from_parts == ("https", "groupware.town.example", "/app")
    assert route.websockets is False


def test_every_error_is_reported_with_its_place(tmp_path: Path) -> None:
    """All problems are listed at once, each with file:line:column and a hint."""
    path = tmp_path / "gateway.yaml"
    text = """\
public_url: https://gw.example
routs: []
server: {workrs: 2, head_timeout: 5x}
routes:
  - name: Groupware
    from: https://g.example
    to: ftp://x
"""
    assert errors_of(tmp_path, text) == [
        f"{path}:2:1: unknown key 'routs' — did you mean 'routes'?",
        f"{path}:3:10: unknown key 'workrs' — did you mean 'workers'?",
        f"{path}:3:35: server.head_timeout: a duration looks like 500ms, 5s, 15m, 12h or 1d",
        f"{path}:5:11: routes.0.name: a route name is 1-63 lower-case letters, digits, '-' or '_',"
        " e.g. 'groupware'",
        f"{path}:7:9: routes.0.to: 'to' must start with http:// or https://",
    ]


def test_unknown_route_key_is_an_error(tmp_path: Path) -> None:
    """A typo in a route (here `pubic`) is refused rather than silently ignored."""
    found = errors_of(tmp_path, VALID + "    pubic: true\n")
    assert found == [
        f"{tmp_path / 'gateway.yaml'}:8:5: unknown key 'pubic' — did you mean 'public'?"
    ]


def test_public_and_policy_together_are_refused(tmp_path: Path) -> None:
    """A route must not be both public and governed by a policy."""
    found = errors_of(tmp_path, VALID + "    policy: staff\n")
    assert len(found) == 1
    assert "set either 'public: true' or 'policy:', not both" in found[0]


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    """A key set twice is an error naming both lines, not a silent override."""
    found = errors_of(tmp_path, VALID + "public_url: https://other.example\n")
    assert found == [
        f"{tmp_path / 'gateway.yaml'}:8:1: duplicate key 'public_url' — it is already set at "
        "line 2; keep one"
    ]


def test_two_routes_claiming_the_same_place_are_refused(tmp_path: Path) -> None:
    """Two routes for the same host and prefix would make routing ambiguous."""
    text = VALID + (
        "  - name: other\n"
        "    from: https://groupware.town.example/app\n"
        "    to: http://127.0.0.1:9002\n"
        "    public: true\n"
    )
    found = errors_of(tmp_path, text)
    assert "routes 'groupware' and 'other' both claim groupware.town.example/app" in found[0]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("https://g.example/a/../b", "must not contain . or .. segments"),
        ("https://g.example/a%2Fb", "must be plain"),
        ("https://user:pw@g.example", "must not carry a user name or password"),
        ("https://g.example/?q=1", "must not have a query"),
    ],
)
def test_route_from_must_be_plain(tmp_path: Path, source: str, message: str) -> None:
    """A route's `from` cannot hide dot-segments, escapes, credentials or queries."""
    text = VALID.replace("https://groupware.town.example/app/", source)
    assert message in errors_of(tmp_path, text)[0]


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TABIJI_<KEY>__<KEY> overrides the file's value."""
    monkeypatch.setenv("TABIJI_LISTEN__PORT", "9443")
    monkeypatch.setenv("TABIJI_SERVER__WORKERS", "3")
    settings = load_settings(write(tmp_path, VALID))
    assert settings.listen.port == 9443
    assert settings.server.workers == 3


def test_settings_are_frozen(tmp_path: Path) -> None:
    """Nothing can change the configuration after it was validated."""
    settings = load_settings(write(tmp_path, VALID))
    with pytest.raises(ValueError, match="frozen"):
        settings.public_url = "https://evil.example"  # type: ignore[misc]
    assert isinstance(settings, GatewaySettings)


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    """A CA bundle named relative to the config is found wherever the gateway is started."""
    (tmp_path / "ca.pem").write_text("not checked here", encoding="utf-8")
    text = VALID.replace("http://127.0.0.1:9001/base", "https://internal.example") + (
        "    tls_ca_bundle: ca.pem\n"
    )
    settings = load_settings(write(tmp_path, text))
    assert settings.routes[0].tls_ca_bundle is not None


def test_tls_ca_bundle_needs_an_https_upstream(tmp_path: Path) -> None:
    """A CA bundle on a plain-HTTP upstream is a mistake worth naming."""
    (tmp_path / "ca.pem").write_text("x", encoding="utf-8")
    found = errors_of(tmp_path, VALID + "    tls_ca_bundle: ca.pem\n")
    assert "'tls_ca_bundle' only applies to an https:// upstream" in found[0]


def test_unreadable_file_is_a_precise_error(tmp_path: Path) -> None:
    """A missing file is reported as such, not as a stack trace."""
    with pytest.raises(SourceErrors) as caught:
        load_settings(tmp_path / "missing.yaml")
    assert "cannot read the file: No such file or directory" in str(caught.value)


def test_example_configs_are_valid_but_for_absent_files() -> None:
    """deploy/'s annotated example has only 'file not found' problems on a developer machine."""
    root = Path(__file__).resolve().parents[2]
    load_settings(root / "deploy/examples/minimal.yaml")
    with pytest.raises(SourceErrors) as caught:
        load_settings(root / "deploy/gateway.example.yaml")
    assert all("Path does not point to a" in e.message for e in caught.value.errors)
