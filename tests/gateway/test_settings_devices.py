"""The `devices:` settings section: off unless configured, defaults, checks with file:line."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import GatewaySettings, load_settings
from policies.yaml_source import SourceErrors

BASE = """\
public_url: https://gateway.town.example
routes:
  - name: groupware
    from: https://groupware.town.example
    to: http://127.0.0.1:9001
    public: true
"""
POLICY = "policies:\n  - name: it-admins\n    allow: {group: it}\n"


def load(tmp_path: Path, text: str) -> GatewaySettings:
    path = tmp_path / "gateway.yaml"
    path.write_text(text, encoding="utf-8")
    return load_settings(path)


def errors_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(SourceErrors) as caught:
        load(tmp_path, text)
    return [str(error) for error in caught.value.errors]


def test_device_trust_is_off_without_a_devices_section(tmp_path: Path) -> None:
    """No section: device trust is off, and the CLI's store default still lies beside the file."""
    devices = load(tmp_path, BASE).devices
    assert devices.enabled is False
    assert devices.store == f"sqlite:///{tmp_path / 'devices.db'}"


def test_any_devices_key_turns_it_on_with_the_documented_defaults(tmp_path: Path) -> None:
    """A section with any key is on; every other setting has its documented default."""
    devices = load(tmp_path, BASE + "devices:\n  binding_max_age: 4h\n").devices
    assert devices.enabled is True
    assert devices.binding_max_age == 4 * 3600
    assert devices.ca_dir == tmp_path / "device-ca"
    assert devices.certificate_lifetime == 30 * 86400
    assert devices.enrolment_code_ttl == 900
    assert devices.pending_ttl == 7 * 86400
    assert devices.report_interval == 300
    assert devices.max_clock_skew == 300
    assert devices.loopback_ports == [47801, 47802, 47803, 47804, 47805]
    assert devices.registry_poll_interval == 0.5
    assert devices.registry_stale_after == 10
    assert devices.client_cert_header is None
    assert devices.attestation_ca_files == []
    assert devices.auto_approve_policy is None
    assert devices.admin_policy is None
    assert (
        devices.rate_limit.enrol_per_address.per_minute,
        devices.rate_limit.enrol_per_address.burst,
    ) == (10, 5)
    off = load(tmp_path, BASE + "devices:\n  enabled: false\n  binding_max_age: 4h\n").devices
    assert off.enabled is False


def test_relative_paths_are_beside_the_config_file(tmp_path: Path) -> None:
    """The store, the CA directory and the attestation CAs resolve against the config's folder."""
    (tmp_path / "ek-ca.pem").write_text("x", encoding="utf-8")
    text = BASE + (
        "devices:\n  store: sqlite:///data/devices.db\n  ca_dir: pki\n"
        "  attestation_ca_files: [ek-ca.pem]\n"
    )
    devices = load(tmp_path, text).devices
    assert devices.store == f"sqlite:///{tmp_path / 'data' / 'devices.db'}"
    assert devices.ca_dir == tmp_path / "pki"
    assert devices.attestation_ca_files == [tmp_path / "ek-ca.pem"]


def test_the_admin_and_approval_policies_must_exist(tmp_path: Path) -> None:
    """An unknown admin_policy / auto_approve_policy is reported where it is written."""
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    (policy_dir / "policies.yaml").write_text(POLICY, encoding="utf-8")
    text = BASE + (
        "policies: {dir: policies}\n"
        "devices:\n  admin_policy: it-admin\n  auto_approve_policy: nobody\n"
    )
    found = errors_of(tmp_path, text)
    path = tmp_path / "gateway.yaml"
    assert found == [
        f"{path}:9:17: unknown policy 'it-admin' — did you mean 'it-admins'?",
        f"{path}:10:24: unknown policy 'nobody' — known: accept, it-admins, reject",
    ]
    ok = BASE + "policies: {dir: policies}\ndevices:\n  admin_policy: it-admins\n"
    assert load(tmp_path, ok).devices.admin_policy == "it-admins"


def test_the_client_certificate_header_is_a_plain_unreserved_name(tmp_path: Path) -> None:
    """The header is lower-cased; a header the gateway reads itself is refused."""
    devices = load(tmp_path, BASE + "devices:\n  client_cert_header: X-Client-Cert\n").devices
    assert devices.client_cert_header == "x-client-cert"
    found = errors_of(tmp_path, BASE + "devices:\n  client_cert_header: Authorization\n")
    assert "a header the gateway reads itself" in found[0]
    found = errors_of(tmp_path, BASE + "devices:\n  client_cert_header: 'X Cert'\n")
    assert "a header name is letters, digits and '-'" in found[0]


@pytest.mark.parametrize(
    ("ports", "message"),
    [
        ("[80]", "ports from 1024 up"),
        ("[47801, 47801]", "each loopback port once"),
        ("[]", "at least 1 item"),
    ],
)
def test_loopback_ports_are_unprivileged_and_distinct(
    tmp_path: Path, ports: str, message: str
) -> None:
    """The agent listens without privileges, each port once, at least one."""
    found = errors_of(tmp_path, BASE + f"devices:\n  loopback_ports: {ports}\n")
    assert message in found[0]


def test_the_registry_must_go_stale_after_more_than_one_poll(tmp_path: Path) -> None:
    """registry_stale_after shorter than the poll interval would refuse every device."""
    text = BASE + "devices:\n  registry_poll_interval: 2s\n  registry_stale_after: 1s\n"
    assert "longer than registry_poll_interval" in errors_of(tmp_path, text)[0]


def test_the_environment_overrides_device_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TABIJI_DEVICES__… overrides the file (and, alone, turns device trust on)."""
    monkeypatch.setenv("TABIJI_DEVICES__BINDING_MAX_AGE", "2h")
    devices = load(tmp_path, BASE).devices
    assert devices.binding_max_age == 7200
    assert devices.enabled is True
