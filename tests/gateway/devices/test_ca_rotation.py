"""Rotating the device CA without downtime: a prepared CA is trusted before it issues, after
activation the old CA's certificates stay valid until pruned, and gateways that were never
restarted follow each step from the shared directory."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest
from cryptography import x509
from registry_helpers import make_key

from gateway.devices.ca import BUNDLE_FILE, CARotationError, DeviceCA
from gateway.devices.ca_cli import run_ca
from gateway.devices.cli import add_devices_parser
from gateway.devices.model import DeviceError

DAY = 86400.0


def issuer_of(pem: str) -> x509.Name:
    return x509.load_pem_x509_certificate(pem.encode()).issuer


def subject_of(pem: str) -> x509.Name:
    return x509.load_pem_x509_certificate(pem.encode()).subject


def untrusted(ca: DeviceCA, pem: str, now: float) -> bool:
    with pytest.raises(DeviceError) as caught:
        ca.verify(pem, now=now)
    return caught.value.code == "device-certificate-untrusted"


def test_rotation_keeps_every_certificate_valid_on_every_gateway(tmp_path: Path) -> None:
    """prepare → activate, run by the CLI while two gateways keep running: the gateway started
    before the rotation and one started after both accept certificates of the old and the new
    CA, and the old gateway issues with the new CA from the activation on, without a restart."""
    directory = tmp_path / "device-ca"
    now = time.time()
    running = DeviceCA(directory)  # a gateway started before the rotation
    old_cert = running.issue("dev-old", make_key().public_key(), now=now).cert_pem
    old_ca = subject_of(running.ca_pem)

    cli = DeviceCA(directory)
    prepared = cli.prepare(now)
    # Prepared: trusted everywhere at once, but the old CA still issues.
    still_old = running.issue("dev-2", make_key().public_key(), now=now).cert_pem
    assert issuer_of(still_old) == old_ca
    assert (directory / BUNDLE_FILE).read_text().count("BEGIN CERTIFICATE") == 2

    cli.activate(now)
    started_after = DeviceCA(directory)  # a replica restarted after the activation
    new_cert = started_after.issue("dev-new", make_key().public_key(), now=now).cert_pem
    assert issuer_of(new_cert) == prepared.subject != old_ca

    for gateway in (running, started_after):
        assert gateway.verify(old_cert, now=now).device_id == "dev-old"
        assert gateway.verify(new_cert, now=now).device_id == "dev-new"
    renewed = running.issue("dev-old", make_key().public_key(), now=now).cert_pem
    assert issuer_of(renewed) == prepared.subject  # the running gateway followed the activation
    assert subject_of(running.ca_pem) == prepared.subject  # and hands the agents the new CA
    # The old CA's private key is gone: only its certificate is kept, as retired.
    retired = list(directory.glob("retired-device-ca-*.pem"))
    assert len(retired) == 1
    assert b"PRIVATE" not in retired[0].read_bytes()
    assert not list(directory.glob("next-*"))
    assert sorted(p.name for p in directory.glob("*key*")) == ["device-ca-key.pem"]


def test_without_the_retired_certificate_old_certificates_are_refused(tmp_path: Path) -> None:
    """What keeps old certificates valid is the retired certificate: without it a fresh gateway
    refuses them (a CA swapped by hand, without `activate`, would lock every device out)."""
    directory = tmp_path / "device-ca"
    now = time.time()
    ca = DeviceCA(directory)
    old_cert = ca.issue("dev-1", make_key().public_key(), now=now).cert_pem
    ca.prepare(now)
    ca.activate(now)
    for path in directory.glob("retired-device-ca-*.pem"):
        path.unlink()
    assert untrusted(DeviceCA(directory), old_cert, now)


def test_prune_forgets_a_retired_ca_only_after_a_certificate_lifetime(tmp_path: Path) -> None:
    """prune keeps a retired CA while certificates it issued may still be valid, then drops it
    (and the bundle shrinks); a gateway started afterwards refuses its certificates."""
    directory = tmp_path / "device-ca"
    now = time.time()
    ca = DeviceCA(directory, lifetime=30 * DAY)
    old_cert = ca.issue("dev-1", make_key().public_key(), now=now).cert_pem
    ca.prepare(now)
    ca.activate(now)
    assert ca.prune(now + 29 * DAY, keep=30 * DAY) == []
    gone = ca.prune(now + 30 * DAY + 1, keep=30 * DAY)
    assert [entry.role for entry in gone] == ["retired"]
    assert [entry.role for entry in ca.trusted()] == ["current"]
    assert (directory / BUNDLE_FILE).read_text().count("BEGIN CERTIFICATE") == 1
    assert untrusted(DeviceCA(directory), old_cert, now)


def test_steps_out_of_order_are_refused(tmp_path: Path) -> None:
    """activate with nothing prepared, or a second prepare, changes nothing and says why."""
    ca = DeviceCA(tmp_path / "device-ca")
    before = ca.ca_pem
    with pytest.raises(CARotationError, match="prepare"):
        ca.activate(time.time())
    ca.prepare(time.time())
    with pytest.raises(CARotationError, match="already prepared"):
        ca.prepare(time.time())
    assert ca.ca_pem == before


def test_a_half_written_directory_keeps_the_loaded_ca(tmp_path: Path) -> None:
    """A gateway that looks while the key and certificate do not match (mid-rename, or a bad
    edit) keeps issuing and verifying with what it had loaded."""
    directory = tmp_path / "device-ca"
    now = time.time()
    running = DeviceCA(directory)
    cert = running.issue("dev-1", make_key().public_key(), now=now).cert_pem
    other = DeviceCA(tmp_path / "other")
    (directory / "device-ca.pem").write_text(other.ca_pem)  # no longer matches the key
    assert running.refresh() is False
    assert issuer_of(running.issue("dev-2", make_key().public_key(), now=now).cert_pem) == (
        issuer_of(cert)
    )
    assert running.verify(cert, now=now).device_id == "dev-1"


def ca_cli(directory: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="tabiji")
    add_devices_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["devices", "ca", *argv])
    return run_ca(args, directory, keep=30 * DAY, record=None, actor="it@town.example")


def test_cli_walks_the_rotation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`tabiji devices ca prepare | activate | status --json | bundle | prune` in order; a
    second activate exits 1."""
    directory = tmp_path / "device-ca"
    DeviceCA(directory).load()
    assert ca_cli(directory, "prepare") == 0
    assert "device-ca-bundle.pem" in capsys.readouterr().out
    assert ca_cli(directory, "activate") == 0
    assert "stays trusted" in capsys.readouterr().out
    assert ca_cli(directory, "activate") == 1
    assert "prepare" in capsys.readouterr().err
    assert ca_cli(directory, "status", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["role"], r["prunable"]) for r in rows] == [("current", False), ("retired", False)]
    assert ca_cli(directory, "bundle", "-o", str(tmp_path / "bundle.pem")) == 0
    assert (tmp_path / "bundle.pem").read_text().count("BEGIN CERTIFICATE") == 2
    assert ca_cli(directory, "prune") == 0
    assert "nothing to prune" in capsys.readouterr().out
