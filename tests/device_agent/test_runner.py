"""The run loop against the protocol peer, on a simulated clock: schedule, change detection,
backoff, certificate renewal, revocation and stopping — real reports, signatures and files."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from agent_gateway_peer import Peer, running_peer

from device_agent.client import GatewayClient
from device_agent.device import EnrolledDevice
from device_agent.enrolment import Enroller, Machine
from device_agent.keys import FileKeyStore, KeyStoreError
from device_agent.report import PostureFacts
from device_agent.runner import Runner, Schedule
from device_agent.state import AgentState

GOOD = PostureFacts(os="linux", disk_encrypted=True, firewall=True)


class SimulatedTime:
    """A monotonic clock that only moves when the loop waits; the loop stops at `stop_at`."""

    def __init__(self, stop_at: float) -> None:
        self.now = 0.0
        self.stop_at = stop_at
        self.waits: list[float] = []
        self.on_wait: Callable[[float], None] | None = None

    def clock(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.now += seconds
        if self.on_wait is not None:
            self.on_wait(self.now)
        return self.now >= self.stop_at


@pytest.fixture
def peer() -> Iterator[Peer]:
    with running_peer() as running:
        yield running


def enrol(peer: Peer, directory: Path, decision: str = "approved") -> EnrolledDevice:
    """A device enrolled with the peer through the real enrolment flow (file key)."""
    peer.state.decision = decision
    state = AgentState(directory)
    client = GatewayClient(peer.origin)
    record = Enroller(
        state=state,
        key_store=FileKeyStore(state.key_directory),
        client=client,
        tell=lambda *a, **k: None,
        open_browser=None,
        machine=Machine("pc-17", "SN1", "linux"),
        sleep=lambda seconds: None,
    ).run()
    key = FileKeyStore(state.key_directory).load()
    assert key is not None
    return EnrolledDevice(state=state, enrolment=record, key=key, client=client)


def reports(peer: Peer) -> list[PostureFacts]:
    (device,) = peer.state.devices.values()
    return [r.facts for r in device.reports]


def test_reports_at_once_then_every_interval(peer: Peer, tmp_path: Path) -> None:
    """Unchanged facts are reported on start and then every 300 s the gateway asks for."""
    device = enrol(peer, tmp_path)
    sim = SimulatedTime(stop_at=1800)
    Runner(device, lambda: GOOD, clock=sim.clock, wait=sim.wait).run()
    assert len(reports(peer)) == 6  # t = 0, 300, …, 1500
    assert max(sim.waits) <= 30  # facts are looked at every 30 s in between


def test_the_gateways_interval_wins(peer: Peer, tmp_path: Path) -> None:
    """next_report_in from the answer replaces the default interval."""
    device = enrol(peer, tmp_path)
    peer.state.next_report_in = 120
    sim = SimulatedTime(stop_at=600)
    Runner(device, lambda: GOOD, clock=sim.clock, wait=sim.wait).run()
    assert len(reports(peer)) == 5  # t = 0, 120, 240, 360, 480


def test_a_changed_fact_is_reported_at_the_next_collection(peer: Peer, tmp_path: Path) -> None:
    """A fact that changes is reported within one collection period, not at the next interval."""
    device = enrol(peer, tmp_path)
    current = [GOOD]
    sim = SimulatedTime(stop_at=150)

    def flip(now: float) -> None:
        if now >= 95:
            current[0] = replace(GOOD, disk_encrypted=False)

    sim.on_wait = flip
    Runner(device, lambda: current[0], clock=sim.clock, wait=sim.wait).run()
    assert [facts.disk_encrypted for facts in reports(peer)] == [True, False]


def count_attempts(device: EnrolledDevice, sim: SimulatedTime) -> list[float]:
    """The simulated times at which the device tries to send a report."""
    attempts: list[float] = []
    send = device.send_report

    def counting(facts: PostureFacts, port: int | None = None) -> object:
        attempts.append(sim.now)
        return send(facts, port)

    device.send_report = counting  # type: ignore[method-assign]
    return attempts


def test_network_errors_back_off_exponentially(peer: Peer, tmp_path: Path) -> None:
    """Failed deliveries are retried after 5, 10, 20, 40 s …, then the schedule resumes."""
    device = enrol(peer, tmp_path)
    sim = SimulatedTime(stop_at=100)
    attempts = count_attempts(device, sim)
    peer.state.fail_next = 4
    Runner(device, lambda: GOOD, clock=sim.clock, wait=sim.wait).run()
    assert attempts == [0, 5, 15, 35, 75]
    assert len(reports(peer)) == 1


def test_backoff_is_capped(peer: Peer, tmp_path: Path) -> None:
    """However long the outage, retries keep coming every backoff_max seconds."""
    device = enrol(peer, tmp_path)
    sim = SimulatedTime(stop_at=1000)
    attempts = count_attempts(device, sim)
    peer.state.fail_next = 1000
    schedule = Schedule(backoff_max=120)
    Runner(device, lambda: GOOD, clock=sim.clock, wait=sim.wait, schedule=schedule).run()
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    assert gaps[:7] == [5, 10, 20, 40, 80, 120, 120]


def test_a_revoked_device_stops_the_loop_and_remembers(peer: Peer, tmp_path: Path) -> None:
    """device-revoked ends `run` and the enrolment record says revoked."""
    device = enrol(peer, tmp_path)
    peer.state.revoked = True
    sim = SimulatedTime(stop_at=10_000)
    last = Runner(device, lambda: GOOD, clock=sim.clock, wait=sim.wait).run()
    assert last is not None
    assert last.error == "device-revoked"
    assert sim.now == 0  # stopped at once, no waiting
    saved = AgentState(tmp_path).load_enrolment()
    assert saved is not None
    assert saved.status == "revoked"


def test_a_probe_failure_skips_a_tick_without_ending_the_agent(peer: Peer, tmp_path: Path) -> None:
    """A collector that raises once delays the report; the loop carries on."""
    device = enrol(peer, tmp_path)
    calls = [0]

    def collect() -> PostureFacts:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("probe bug")
        return GOOD

    sim = SimulatedTime(stop_at=60)
    Runner(device, collect, clock=sim.clock, wait=sim.wait).run()
    assert len(reports(peer)) == 1
    assert min(sim.waits) >= 1  # never a busy loop


def test_a_pending_device_fetches_its_certificate_once_approved(peer: Peer, tmp_path: Path) -> None:
    """When a report says IT approved the device, the record turns approved and a certificate
    is fetched with a device proof."""
    device = enrol(peer, tmp_path, decision="pending")
    assert device.enrolment.certificate is None
    peer.state.decision = "approved"
    sim = SimulatedTime(stop_at=1)
    Runner(device, lambda: GOOD, clock=sim.clock, wait=sim.wait).run()
    saved = AgentState(tmp_path).load_enrolment()
    assert saved is not None
    assert saved.status == "approved"
    assert saved.certificate is not None
    assert "BEGIN CERTIFICATE" in Path(saved.certificate).read_text()
    assert peer.state.certificates_issued == 1


def test_the_certificate_is_renewed_when_a_third_of_its_lifetime_is_left(
    peer: Peer, tmp_path: Path
) -> None:
    """Renewal is due below one third of the lifetime, and the run loop renews it."""
    peer.state.certificate_lifetime = 30 * 86400
    device = enrol(peer, tmp_path)
    window = device.certificate_window()
    assert window is not None
    not_before, not_after = window
    third = (not_after - not_before) / 3
    device.clock = lambda: not_after - third - 60
    assert not device.certificate_due()
    device.clock = lambda: not_after - third + 60
    assert device.certificate_due()
    device.clock = time.time

    peer.state.certificate_lifetime = 10  # the next certificate is already due on arrival
    device.renew_certificate()
    assert device.certificate_due()
    peer.state.certificate_lifetime = 30 * 86400
    sim = SimulatedTime(stop_at=1)
    Runner(device, lambda: GOOD, clock=sim.clock, wait=sim.wait).run()
    assert peer.state.certificates_issued == 3  # enrolment, the short one, the renewal
    assert not device.certificate_due()


def test_stop_ends_a_real_wait(peer: Peer, tmp_path: Path) -> None:
    """stop() (what SIGTERM calls) wakes the loop from its sleep and run() returns."""
    device = enrol(peer, tmp_path)
    runner = Runner(device, lambda: GOOD)
    finished = threading.Event()

    def run() -> None:
        runner.run()
        finished.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not reports(peer) and time.monotonic() < deadline:
        time.sleep(0.02)
    runner.stop()
    assert finished.wait(10)
    assert len(reports(peer)) == 1


class FlakyKey:
    """A device key whose chip is away for the first `failures` uses (e.g. after suspend)."""

    def __init__(self, inner: Any, failures: int) -> None:
        self.inner = inner
        self.failures = failures
        self.storage = inner.storage

    def signing_key(self) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise KeyStoreError("tpm-unavailable", "the TPM did not answer")
        return self.inner.signing_key()

    def public_key(self) -> Any:
        return self.inner.public_key()


def test_a_key_that_cannot_sign_for_a_while_is_retried_not_fatal(
    peer: Peer, tmp_path: Path
) -> None:
    """A TPM that does not answer is trouble to wait out with backoff, said once, not a crash."""
    device = enrol(peer, tmp_path)
    device.key = FlakyKey(device.key, failures=2)  # type: ignore[assignment]
    troubles: list[str] = []
    sim = SimulatedTime(stop_at=60)
    Runner(
        device,
        lambda: GOOD,
        clock=sim.clock,
        wait=sim.wait,
        on_trouble=lambda error: troubles.append(getattr(error, "code", "")),
    ).run()
    assert troubles == ["tpm-unavailable", "tpm-unavailable"]
    assert len(reports(peer)) == 1
