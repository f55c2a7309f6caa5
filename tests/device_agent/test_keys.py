"""The file key store: a 0600 P-256 PEM created atomically, refused when others may read it,
and the choice between TPM and file key stores."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from device_agent import report
from device_agent.keys import (
    KEY_FILE,
    TCTI_ENV,
    TPM_KEY_FILE,
    FileKeyStore,
    KeyStoreError,
    open_key_store,
)

ORIGIN = "https://gw.example"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_created_key_is_private_and_loads_back(tmp_path: Path) -> None:
    """A new key is a 0600 file in a 0700 directory, and loading gives the same P-256 key."""
    store = FileKeyStore(tmp_path / "agent")
    key = store.create()
    assert mode_of(store.path) == 0o600
    assert mode_of(store.directory) == 0o700
    loaded = store.load()
    assert loaded is not None
    assert loaded.storage == "software"
    assert isinstance(loaded.public_key().curve, ec.SECP256R1)
    assert loaded.public_key().public_numbers() == key.public_key().public_numbers()
    assert [p.name for p in store.directory.iterdir()] == [KEY_FILE]  # no temporary left


def test_created_key_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    """The file is private from its first byte, whatever the process umask says."""
    previous = os.umask(0)
    try:
        store = FileKeyStore(tmp_path / "agent")
        store.create()
    finally:
        os.umask(previous)
    assert mode_of(store.path) == 0o600
    assert mode_of(store.directory) == 0o700


def test_create_never_replaces_an_existing_key(tmp_path: Path) -> None:
    """A second create is refused with key-exists and the first key stays as it was."""
    store = FileKeyStore(tmp_path)
    store.create()
    before = store.path.read_bytes()
    with pytest.raises(KeyStoreError) as refused:
        store.create()
    assert refused.value.code == "key-exists"
    assert store.path.read_bytes() == before


def test_create_does_not_write_through_a_planted_symlink(tmp_path: Path) -> None:
    """A symlink planted at the key's path is not followed: create refuses, target untouched."""
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    directory = tmp_path / "agent"
    directory.mkdir(mode=0o700)
    (directory / KEY_FILE).symlink_to(target)
    with pytest.raises(KeyStoreError) as refused:
        FileKeyStore(directory).create()
    assert refused.value.code == "key-exists"
    assert target.read_text() == "untouched"


def test_concurrent_creates_leave_exactly_one_complete_key(tmp_path: Path) -> None:
    """Racing creators: one wins, the others get key-exists, and the file is the winner's key."""
    store_dir = tmp_path / "agent"
    winners: list[ec.EllipticCurvePublicKey] = []
    losers: list[str] = []
    start = threading.Barrier(8)

    def create() -> None:
        start.wait()
        try:
            winners.append(FileKeyStore(store_dir).create().public_key())
        except KeyStoreError as error:
            losers.append(error.code)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1
    assert losers == ["key-exists"] * 7
    loaded = FileKeyStore(store_dir).load()
    assert loaded is not None
    assert loaded.public_key().public_numbers() == winners[0].public_numbers()
    assert sorted(p.name for p in store_dir.iterdir()) == [KEY_FILE]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o610])
def test_load_refuses_a_key_others_may_read(tmp_path: Path, mode: int) -> None:
    """Any group or other permission bit on the key file is refused with a precise message."""
    store = FileKeyStore(tmp_path)
    store.create()
    store.path.chmod(mode)
    with pytest.raises(KeyStoreError) as refused:
        store.load()
    assert refused.value.code == "key-permissions-too-open"
    assert str(store.path) in refused.value.detail
    assert f"{mode:04o}" in refused.value.detail


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_load_refuses_a_key_owned_by_another_user(tmp_path: Path) -> None:
    """A key file that belongs to another user is not this user's key."""
    store = FileKeyStore(tmp_path)
    store.create()
    os.chown(store.path, 54321, -1)
    with pytest.raises(KeyStoreError) as refused:
        store.load()
    assert refused.value.code == "key-wrong-owner"


def test_create_refuses_a_directory_others_may_write(tmp_path: Path) -> None:
    """A state directory writable by others (who could swap the key) is refused."""
    directory = tmp_path / "agent"
    directory.mkdir()
    directory.chmod(0o777)
    with pytest.raises(KeyStoreError) as refused:
        FileKeyStore(directory).create()
    assert refused.value.code == "key-dir-permissions-too-open"
    assert not (directory / KEY_FILE).exists()


def test_load_without_a_key_is_none(tmp_path: Path) -> None:
    """No key file yet means no key, not an error."""
    assert FileKeyStore(tmp_path / "missing").load() is None


def test_load_refuses_garbage_and_other_curves(tmp_path: Path) -> None:
    """A file that is not a P-256 private key is refused as key-invalid."""
    store = FileKeyStore(tmp_path)
    store.path.write_bytes(b"not a key")
    store.path.chmod(0o600)
    with pytest.raises(KeyStoreError) as refused:
        store.load()
    assert refused.value.code == "key-invalid"
    p384 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    store.path.write_bytes(p384)
    with pytest.raises(KeyStoreError) as refused:
        store.load()
    assert refused.value.code == "key-invalid"


def test_file_key_signs_reports_the_gateway_accepts(tmp_path: Path) -> None:
    """A report signed through signing_key() verifies with the key's public half; no attestation."""
    key = FileKeyStore(tmp_path).create()
    now = time.time()
    facts = report.PostureFacts(os="linux", firewall=True)
    with key.signing_key() as signer:
        token = report.sign_report(
            report.PostureReport("dev-1", ORIGIN, 1, int(now), facts), signer
        )
    accepted = report.verify_report(
        token, key.public_key(), device_id="dev-1", audience=ORIGIN, now=now
    )
    assert accepted.facts == facts
    assert key.attestation_evidence(b"n" * 32) is None
    assert key.activate_credential({"format": "x"}) is None


def test_store_choice_without_a_tpm_is_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No TCTI anywhere (no usable /dev/tpmrm0 either) or prefer_tpm=False: the file store."""
    monkeypatch.delenv(TCTI_ENV, raising=False)
    if os.access("/dev/tpmrm0", os.R_OK | os.W_OK):
        pytest.skip("this machine has a usable kernel TPM")
    assert open_key_store(tmp_path).kind == "software"
    assert open_key_store(tmp_path, tcti="swtpm:port=1", prefer_tpm=False).kind == "software"


def test_store_choice_with_a_dead_tpm_is_the_file(tmp_path: Path) -> None:
    """A TCTI where no TPM answers falls back to the file store (no key exists yet)."""
    assert open_key_store(tmp_path, tcti="swtpm:host=127.0.0.1,port=9").kind == "software"


def test_an_existing_file_key_stays_a_file_key(tmp_path: Path) -> None:
    """Once a device has a file key, a TPM appearing later does not switch stores."""
    FileKeyStore(tmp_path).create()
    assert open_key_store(tmp_path, tcti="swtpm:host=127.0.0.1,port=9").kind == "software"


def test_a_tpm_key_never_downgrades_to_a_file_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TPM key on disk with no reachable TPM is an error, never a silent new file key."""
    monkeypatch.delenv(TCTI_ENV, raising=False)
    if os.access("/dev/tpmrm0", os.R_OK | os.W_OK):
        pytest.skip("this machine has a usable kernel TPM")
    (tmp_path / TPM_KEY_FILE).write_text("{}")
    with pytest.raises(KeyStoreError) as refused:
        open_key_store(tmp_path)
    assert refused.value.code == "tpm-unavailable"
