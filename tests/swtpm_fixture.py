"""A real software TPM (swtpm) for tests: provisioned by `swtpm_setup` with an EK certificate
from swtpm's local CA, kept entirely in temporary directories (nothing in /etc or /var).

Make the pytest fixtures visible in a test module (or conftest) by binding them there:
    from tests import swtpm_fixture
    swtpm_template = swtpm_fixture.swtpm_template
    swtpm = swtpm_fixture.swtpm
`swtpm` is a fresh copy of one provisioned state (so every copy has the same EK); call
`provision_tpm()` for a different chip. Absent swtpm skips, or fails when CI=true.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REQUIRED_TOOLS = ("swtpm", "swtpm_setup", "swtpm_localca", "certtool")
START_TIMEOUT = 10.0


@dataclass(frozen=True)
class ProvisionedTpm:
    """A TPM state directory made by swtpm_setup, and the local CA that signed its EK cert."""

    state_dir: Path
    ca_dir: Path
    ca_cert_pem_paths: tuple[Path, ...]  # (root CA, intermediate "swtpm-localca")


@dataclass(frozen=True)
class Swtpm:
    """A running swtpm on 127.0.0.1."""

    tcti: str  # "swtpm:host=127.0.0.1,port=P" for tpm2-pytss / tpm2-tools
    ca_cert_pem_paths: tuple[Path, ...]
    state_dir: Path
    pid: int
    port: int
    ctrl_port: int


def require_swtpm() -> None:
    """Skip when the swtpm tools are missing; fail instead when CI=true (CI installs them)."""
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        reason = (
            f"swtpm tools not installed ({', '.join(missing)}): apt-get install swtpm swtpm-tools"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


def _localca_config(workdir: Path, ca_dir: Path) -> Path:
    """swtpm_setup.conf + swtpm-localca.conf pointing at `ca_dir` instead of /var/lib."""
    ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    localca = workdir / "swtpm-localca.conf"
    localca.write_text(
        f"statedir = {ca_dir}\n"
        f"signingkey = {ca_dir}/signkey.pem\n"
        f"issuercert = {ca_dir}/issuercert.pem\n"
        f"certserial = {ca_dir}/certserial\n"
    )
    options = workdir / "swtpm-localca.options"
    options.write_text(
        "--platform-manufacturer Tabiji\n--platform-version 2.1\n--platform-model test\n"
    )
    setup = workdir / "swtpm_setup.conf"
    setup.write_text(
        "create_certs_tool = /usr/bin/swtpm_localca\n"
        f"create_certs_tool_config = {localca}\n"
        f"create_certs_tool_options = {options}\n"
        "active_pcr_banks = sha256\n"
    )
    return setup


def provision_tpm(workdir: Path, *, ca_dir: Path | None = None) -> ProvisionedTpm:
    """A new TPM (its own endorsement seed) with RSA and ECC EKs and their certificates.

    `ca_dir` reuses an existing local CA (a second chip from the same "manufacturer").
    """
    require_swtpm()
    workdir.mkdir(parents=True, exist_ok=True)
    ca_dir = ca_dir or workdir / "localca"
    state_dir = workdir / "tpm-state"
    state_dir.mkdir(mode=0o700)
    config = _localca_config(workdir, ca_dir)
    result = subprocess.run(
        [
            "swtpm_setup",
            "--tpm2",
            "--tpmstate",
            str(state_dir),
            "--create-ek-cert",
            "--create-platform-cert",
            "--config",
            str(config),
            "--logfile",
            str(workdir / "swtpm_setup.log"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        log = (workdir / "swtpm_setup.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"swtpm_setup failed ({result.returncode}): {result.stderr}{log}")
    roots = (ca_dir / "swtpm-localca-rootca-cert.pem", ca_dir / "issuercert.pem")
    return ProvisionedTpm(state_dir, ca_dir, roots)


def _free_port_pair() -> int:
    """A free port P with P+1 free too: the swtpm TCTI talks to the control channel on P+1."""
    for _attempt in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two adjacent free ports on 127.0.0.1")


def _wait_listening(process: subprocess.Popen[bytes], port: int) -> bool:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            # The control channel: a probe there does not occupy the TPM command channel.
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.kill(process.pid, 15)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, 9)
            process.wait(timeout=5)


@contextmanager
def running_swtpm(workdir: Path, provisioned: ProvisionedTpm | None = None) -> Iterator[Swtpm]:
    """swtpm on free loopback ports over a fresh copy of `provisioned` (or a new TPM), killed
    by PID on exit."""
    require_swtpm()
    workdir.mkdir(parents=True, exist_ok=True)
    provisioned = provisioned or provision_tpm(workdir / "provisioned")
    state_dir = workdir / "swtpm-state"
    shutil.copytree(provisioned.state_dir, state_dir)
    for _attempt in range(3):  # a free port can be taken between probing and binding
        port = _free_port_pair()
        ctrl_port = port + 1
        log = workdir / f"swtpm-{port}.log"
        process = subprocess.Popen(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--server",
                f"type=tcp,port={port},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={ctrl_port},bindaddr=127.0.0.1",
                "--flags",
                "not-need-init,startup-clear",
                "--tpmstate",
                f"dir={state_dir}",
                "--log",
                f"file={log}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if _wait_listening(process, ctrl_port):
            break
        _stop(process)
    else:
        raise RuntimeError(f"swtpm did not start; see {workdir}")
    try:
        yield Swtpm(
            tcti=f"swtpm:host=127.0.0.1,port={port}",
            ca_cert_pem_paths=provisioned.ca_cert_pem_paths,
            state_dir=state_dir,
            pid=process.pid,
            port=port,
            ctrl_port=ctrl_port,
        )
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def swtpm_template(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedTpm:
    """One provisioned TPM state per test session (swtpm_setup takes ~1.5 s)."""
    return provision_tpm(tmp_path_factory.mktemp("swtpm-template"))


@pytest.fixture
def swtpm(swtpm_template: ProvisionedTpm, tmp_path: Path) -> Iterator[Swtpm]:
    """A running swtpm over a fresh copy of the provisioned state, stopped after the test."""
    with running_swtpm(tmp_path / "swtpm", swtpm_template) as running:
        yield running
