"""Podman for the deployment tests: a private containers.conf, the local Debian base image, running
podman commands, and removing by name everything a test created. Test helper only (no tests here);
it imports nothing from the project, so any tests/deploy module may use it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = "localhost/bookworm-min"
SUITE = "bookworm"
# Out of the box podman 4.3.1 fails here twice (setrlimit RLIMIT_NOFILE, "cgroups in hybrid mode
# not supported"): this file, handed only to podman's own subprocesses through CONTAINERS_CONF,
# fixes both without touching /etc (shared/notes/deploy-checks.md). nproc above 32768 fails.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# One base image per machine, built once: a lock file keeps parallel sessions (this module is
# shared with the systemd tests) from running two debootstraps into the same image name.
_BASE_LOCK = Path(tempfile.gettempdir()) / "tabiji-bookworm-min.lock"
DEFAULT_TIMEOUT = 600.0


def must_have(condition: bool, reason: str) -> None:
    """Skip when a real component is missing; fail instead when CI=true (CI provides it)."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def unique_name(prefix: str = "tabiji-test") -> str:
    """A container/network/image name no other test run uses (podman names are global)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class PodmanError(RuntimeError):
    """A podman command exited non-zero; the message carries its command line and output."""


@dataclass
class Podman:
    """Runs podman (and podman-compose) with the private containers.conf; tracks what to remove.

    Register every container, pod, network, volume and image a test creates (`track_*`), by
    name: `cleanup()` removes exactly those, never anything else on the machine.
    """

    executable: str
    conf: Path
    containers: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    pods: list[str] = field(default_factory=list)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment for a podman subprocess: ours plus CONTAINERS_CONF (never exported)."""
        environment = dict(os.environ)
        environment["CONTAINERS_CONF"] = str(self.conf)
        if extra:
            environment.update(extra)
        return environment

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        input_bytes: bytes | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`podman ARGS…`; raises PodmanError (with stdout and stderr) when `check` and rc ≠ 0."""
        return self.command(
            [self.executable, *args], check=check, timeout=timeout, cwd=cwd, input_bytes=input_bytes
        )

    def command(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        input_bytes: bytes | None = None,
        cwd: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Any command that drives podman (podman-compose, buildah) under the private config."""
        completed = subprocess.run(
            list(argv),
            input=input_bytes,
            capture_output=True,
            timeout=timeout,
            env=self.env(extra_env),
            cwd=cwd,
            check=False,
        )
        result = subprocess.CompletedProcess(
            completed.args,
            completed.returncode,
            completed.stdout.decode(errors="replace"),
            completed.stderr.decode(errors="replace"),
        )
        if check and result.returncode != 0:
            raise PodmanError(
                f"{' '.join(argv)} exited {result.returncode}\n"
                f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
            )
        return result

    def exists(self, kind: str, name: str) -> bool:
        """`podman {image,container,network,volume,pod} exists NAME`."""
        if kind == "network":
            # podman 4.3 has `network exists`; keep one code path for every kind anyway.
            return self.run("network", "exists", name, check=False).returncode == 0
        return self.run(kind, "exists", name, check=False).returncode == 0

    def track_container(self, name: str) -> str:
        self.containers.append(name)
        return name

    def track_network(self, name: str) -> str:
        self.networks.append(name)
        return name

    def track_volume(self, name: str) -> str:
        self.volumes.append(name)
        return name

    def track_image(self, name: str) -> str:
        self.images.append(name)
        return name

    def track_pod(self, name: str) -> str:
        self.pods.append(name)
        return name

    def logs(self, container: str, tail: int = 200) -> str:
        """The last lines a container wrote (stdout and stderr), for failure messages."""
        result = self.run("logs", "--tail", str(tail), container, check=False, timeout=30)
        return result.stdout + result.stderr

    def cleanup(self) -> list[str]:
        """Remove every tracked object (containers first); returns the errors, never raises."""
        errors: list[str] = []

        def remove(*args: str) -> None:
            result = self.run(*args, check=False, timeout=120)
            if result.returncode != 0 and "no such" not in result.stderr.lower():
                errors.append(f"podman {' '.join(args)}: {result.stderr.strip()}")

        for name in reversed(self.containers):
            remove("rm", "--force", "--volumes", "--time", "5", "--ignore", name)
        for name in reversed(self.pods):
            remove("pod", "rm", "--force", "--ignore", name)
        for name in reversed(self.volumes):
            remove("volume", "rm", "--force", name)
        for name in reversed(self.networks):
            remove("network", "rm", "--force", name)
        for name in reversed(self.images):
            remove("rmi", "--force", name)
        self.containers.clear()
        self.pods.clear()
        self.volumes.clear()
        self.networks.clear()
        self.images.clear()
        return errors


def podman_executable() -> str | None:
    """The podman binary on PATH, or None."""
    return shutil.which("podman")


def write_containers_conf(directory: Path) -> Path:
    """Write the private containers.conf into `directory` and return its path."""
    path = directory / "containers.conf"
    path.write_text(CONTAINERS_CONF, encoding="utf-8")
    return path


def apt_mirror() -> str:
    """The Debian mirror this machine's apt already uses (debootstrap fetches from it)."""
    sources = [Path("/etc/apt/sources.list")]
    directory = Path("/etc/apt/sources.list.d")
    if directory.is_dir():
        sources += sorted(directory.iterdir())
    for path in sources:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        # deb822 stanzas: URIs + Suites naming the bookworm main suite.
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.MULTILINE)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.MULTILINE)
            if uris and suites and SUITE in suites.group(1).split():
                return uris.group(1).rstrip("/")
        # one-line format: deb [opts] URI SUITE COMPONENTS
        for line in text.splitlines():
            match = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line.strip())
            if match and match.group(2) == SUITE:
                return match.group(1).rstrip("/")
    return "http://deb.debian.org/debian"


def _security_mirror(mirror: str) -> str:
    """The security archive beside `mirror` (deb.debian.org/debian → …/debian-security)."""
    return (
        mirror + "-security"
        if mirror.endswith("/debian")
        else "http://deb.debian.org/debian-security"
    )


def ensure_base_image(podman: Podman, image: str = BASE_IMAGE) -> str:
    """Build `image` (Debian bookworm minbase by debootstrap) unless it already exists.

    Built once per machine and kept (it is the cache that keeps CI fast); never removed by
    cleanup. Its apt sources name the same mirror as the host, like debian:bookworm-slim's.
    """
    if podman.exists("image", image):
        return image
    debootstrap = shutil.which("debootstrap")
    must_have(debootstrap is not None, "debootstrap is not installed (apt-get install debootstrap)")
    assert debootstrap is not None
    with _BASE_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if podman.exists("image", image):
            return image
        mirror = apt_mirror()
        root = Path(tempfile.mkdtemp(prefix="tabiji-debootstrap-"))
        try:
            subprocess.run(
                [debootstrap, "--variant=minbase", SUITE, str(root), mirror],
                check=True,
                capture_output=True,
                timeout=900,
            )
            sources = root / "etc/apt/sources.list.d/debian.sources"
            sources.write_text(
                f"Types: deb\nURIs: {mirror}\nSuites: {SUITE} {SUITE}-updates\n"
                "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
                f"Types: deb\nURIs: {_security_mirror(mirror)}\nSuites: {SUITE}-security\n"
                "Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
                encoding="utf-8",
            )
            (root / "etc/apt/sources.list").unlink(missing_ok=True)
            # What an image needs no copy of: package lists and downloaded .debs.
            for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for entry in (root / leftover).glob("*"):
                    if entry.is_file():
                        entry.unlink()
            tar = subprocess.Popen(
                ["tar", "--numeric-owner", "-C", str(root), "-c", "."],
                stdout=subprocess.PIPE,
            )
            assert tar.stdout is not None
            try:
                completed = subprocess.run(
                    [podman.executable, "import", "--change", 'CMD ["/bin/bash"]', "-", image],
                    stdin=tar.stdout,
                    capture_output=True,
                    env=podman.env(),
                    timeout=600,
                    check=False,
                )
            finally:
                tar.stdout.close()
                tar.wait(60)
            if completed.returncode != 0 or tar.returncode != 0:
                raise PodmanError(
                    f"podman import {image} failed: {completed.stderr.decode(errors='replace')}"
                )
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return image


# -- host side effects of netavark ---------------------------------------------------------------


@dataclass(frozen=True)
class HostNetState:
    """What netavark changes on the host and leaves behind: ip_forward and NETAVARK* chains."""

    ip_forward: str
    chains: frozenset[tuple[str, str]]


def _netavark_chains() -> frozenset[tuple[str, str]]:
    chains: set[tuple[str, str]] = set()
    iptables = shutil.which("iptables")
    if iptables is None:
        return frozenset()
    for table in ("filter", "nat"):
        result = subprocess.run(
            [iptables, "-t", table, "-S"], capture_output=True, text=True, check=False, timeout=30
        )
        for line in result.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == "-N" and parts[1].startswith("NETAVARK"):
                chains.add((table, parts[1]))
    return frozenset(chains)


def host_net_state() -> HostNetState:
    """Snapshot ip_forward and the NETAVARK* iptables chains before podman networking runs."""
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    value = forward.read_text().strip() if forward.exists() else "1"
    return HostNetState(ip_forward=value, chains=_netavark_chains())


def restore_host_net(podman: Podman, before: HostNetState) -> None:
    """Undo netavark's host changes — only when no container at all is running any more (another
    session's container may still need forwarding) and only what was not there before."""
    running = podman.run("ps", "-q", check=False, timeout=30).stdout.strip()
    if running:
        return
    iptables = shutil.which("iptables")
    if iptables is not None:
        created = _netavark_chains() - before.chains
        names = {chain for _, chain in created}
        for table in sorted({table for table, _ in created}):
            # The jumps into them from the built-in chains, each deleted by its exact spec.
            rules = subprocess.run(
                [iptables, "-t", table, "-S"], capture_output=True, text=True, check=False
            ).stdout.splitlines()
            for rule in rules:
                parts = shlex.split(rule)
                if len(parts) > 2 and parts[0] == "-A" and parts[1] not in names:
                    target = parts[parts.index("-j") + 1] if "-j" in parts else ""
                    if target in names:
                        subprocess.run(
                            [iptables, "-t", table, "-D", *parts[1:]],
                            capture_output=True,
                            check=False,
                        )
            # Flush all first: a chain still referenced by another cannot be deleted.
            for chain in sorted(c for t, c in created if t == table):
                subprocess.run(
                    [iptables, "-t", table, "-F", chain], capture_output=True, check=False
                )
            for chain in sorted(c for t, c in created if t == table):
                subprocess.run(
                    [iptables, "-t", table, "-X", chain], capture_output=True, check=False
                )
    if before.ip_forward == "0":
        with contextlib.suppress(OSError):
            Path("/proc/sys/net/ipv4/ip_forward").write_text("0\n")


# -- build helpers -------------------------------------------------------------------------------


@contextlib.contextmanager
def host_ca_secret() -> Iterator[list[str]]:
    """`podman build` arguments that lend the host's CA bundle to RUN steps as a build secret.

    Builds reach PyPI over HTTPS; inside the image the host's CA bundle is needed to verify it
    (shared/notes/deploy-checks.md). A secret is mounted only while a RUN step runs: it is never
    in the build context, never in a layer, never committed.
    """
    if CA_BUNDLE.is_file():
        yield ["--secret", f"id=host_ca,src={CA_BUNDLE}"]
    else:
        yield []


def image_id(podman: Podman, name: str) -> str | None:
    """The ID of the image `name`, or None when there is none."""
    result = podman.run("image", "inspect", "--format", "{{.Id}}", name, check=False, timeout=60)
    return result.stdout.strip() or None if result.returncode == 0 else None


def drop_superseded(podman: Podman, name: str, before: str | None) -> None:
    """After a rebuild of the cached image `name`, remove the version it replaced (by ID, and
    only if nothing else uses it), so the per-machine cache never grows by stale copies."""
    if before is not None and before != image_id(podman, name):
        podman.run("rmi", before, check=False, timeout=120)


def build_image(
    podman: Podman,
    tag: str,
    containerfile: Path,
    context: Path,
    *,
    build_args: Mapping[str, str] | None = None,
    keep: bool = False,
    timeout: float = 1200.0,
) -> float:
    """`podman build --format docker` (HEALTHCHECK kept); returns the seconds it took.

    keep=False: the image is tracked and removed at cleanup. keep=True: it stays as the
    per-machine build cache under its fixed name (the next build reuses its layers and takes
    seconds when nothing changed); the version a rebuild replaces is removed at once.
    """
    args = ["build", "--format", "docker", "--network", "host", "-f", str(containerfile), "-t", tag]
    for key, value in (build_args or {}).items():
        args += ["--build-arg", f"{key}={value}"]
    started = time.monotonic()
    before = image_id(podman, tag) if keep else None
    if not keep:
        podman.track_image(tag)
    with host_ca_secret() as secret:
        podman.run(*args, *secret, str(context), timeout=timeout)
    drop_superseded(podman, tag, before)
    return time.monotonic() - started


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def podman_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """A working podman with the private containers.conf and the local base image, once per run.

    Skips when podman is absent (fails under CI=true). At the end it removes whatever the session
    tracked and undoes netavark's host changes if nothing else runs.
    """
    executable = podman_executable()
    must_have(executable is not None, "podman is not installed (apt-get install podman)")
    assert executable is not None
    conf = write_containers_conf(tmp_path_factory.mktemp("podman-conf"))
    session = Podman(executable=executable, conf=conf)
    probe = session.run("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=60)
    must_have(probe.returncode == 0, f"podman does not work here: {probe.stderr.strip()}")
    before = host_net_state()
    ensure_base_image(session)
    try:
        yield session
    finally:
        errors = session.cleanup()
        restore_host_net(session, before)
        if errors:
            pytest.fail("podman cleanup failed:\n" + "\n".join(errors))


@pytest.fixture
def podman(podman_session: Podman) -> Iterator[Podman]:
    """Per-test tracking on the session's podman: what the test registers is removed after it."""
    per_test = Podman(executable=podman_session.executable, conf=podman_session.conf)
    try:
        yield per_test
    finally:
        errors = per_test.cleanup()
        if errors:
            pytest.fail("podman cleanup failed:\n" + "\n".join(errors))
