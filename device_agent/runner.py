"""`tabiji-agent run`: report on a schedule and at once when a fact changes; renew the certificate.

Facts are collected cheaply every ~30 s; a report goes out when they differ from the last reported
ones or when the gateway's interval (default 5 min) has passed. Network trouble backs off
exponentially. The clock and the wait are injected, so tests drive hours of schedule in
milliseconds, and `stop()` (SIGTERM/SIGINT) ends the loop at the next wait.
Must not import the gateway.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from device_agent.client import GatewayError
from device_agent.device import EnrolledDevice
from device_agent.keys import KeyStoreError
from device_agent.report import PostureFacts
from device_agent.state import LastReport, StateError

log = logging.getLogger("tabiji_agent.runner")
MIN_WAIT = 1.0  # never spin: whatever happens, the loop sleeps at least this long
# Trouble that waiting may cure: the network or gateway (GatewayError raised by send_report is
# always retryable: refusals are answers), a TPM busy or gone after suspend, a full disk.
_TROUBLE = (GatewayError, KeyStoreError, StateError, OSError)


def _code(error: Exception) -> str:
    return str(getattr(error, "code", type(error).__name__))


@dataclass(frozen=True, slots=True)
class Schedule:
    report_every: float = 300.0  # until the gateway says otherwise (next_report_in)
    collect_every: float = 30.0
    backoff_first: float = 5.0
    backoff_max: float = 300.0


class Runner:
    """The loop. `collect` returns the current facts; `wait(seconds)` returns True to stop."""

    def __init__(
        self,
        device: EnrolledDevice,
        collect: Callable[[], PostureFacts],
        *,
        schedule: Schedule | None = None,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], bool] | None = None,
        loopback_port: int | None = None,
        on_report: Callable[[LastReport], None] | None = None,
        on_trouble: Callable[[Exception], None] | None = None,
    ) -> None:
        self.device = device
        self.collect = collect
        self.schedule = schedule or Schedule()
        self.clock = clock
        self._stop = threading.Event()
        self.wait = wait or self._stop.wait
        self.loopback_port = loopback_port
        self.on_report = on_report
        self.on_trouble = on_trouble
        self.reports_sent = 0
        self._last_facts: PostureFacts | None = None
        self._report_due = 0.0  # at once on start
        self._report_failures = 0
        self._renew_due = 0.0
        self._renew_failures = 0

    def stop(self) -> None:
        """Ask the loop to end (signal handlers call this); it ends at the next wait."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> LastReport | None:
        """Loop until stopped or until the device is revoked; the last answer is returned."""
        last: LastReport | None = None
        while not self.stopping:
            last = self.step() or last
            if last is not None and last.error in ("device-revoked", "device-unknown"):
                log.warning("the gateway refuses this device (%s): stopping", last.error)
                break
            if self.wait(self._next_wake()):
                break
        return last

    def step(self) -> LastReport | None:
        """One tick: collect, report if due or changed, renew if due. Never raises for the
        network; a probe failure is logged and the tick skipped (no half-known report)."""
        now = self.clock()
        try:
            facts = self.collect()
        except Exception:  # a probe bug must not end the agent; nothing is reported this tick
            log.exception("collecting posture facts failed")
            self._report_due = max(self._report_due, now + self.schedule.collect_every)
            return None
        changed = self._last_facts is not None and facts != self._last_facts
        backing_off = self._report_failures > 0
        answer: LastReport | None = None
        if now >= self._report_due or (changed and not backing_off):
            answer = self._report(facts, now)
        if now >= self._renew_due and self.device.certificate_due():
            self._renew(now)
        return answer

    def _report(self, facts: PostureFacts, now: float) -> LastReport | None:
        try:
            answer = self.device.send_report(facts, self.loopback_port)
        except _TROUBLE as error:
            self._report_failures += 1
            delay = self._backoff(self._report_failures, getattr(error, "retry_after", None))
            log.info("report not delivered (%s); next try in %.0f s", _code(error), delay)
            self._report_due = now + delay
            self._tell_trouble(error)
            return None
        self._report_failures = 0
        self._last_facts = facts
        self.reports_sent += 1
        interval = self.device.next_report_in or self.schedule.report_every
        self._report_due = now + interval
        if self.on_report is not None:
            self.on_report(answer)
        return answer

    def _renew(self, now: float) -> None:
        try:
            self.device.renew_certificate()
        except _TROUBLE as error:
            self._renew_failures += 1
            retry_after = getattr(error, "retry_after", None)
            self._renew_due = now + self._backoff(self._renew_failures, retry_after)
            log.info("certificate renewal failed (%s)", _code(error))
            self._tell_trouble(error)
            return
        self._renew_failures = 0
        log.info("device certificate renewed")

    def _tell_trouble(self, error: Exception) -> None:
        if self.on_trouble is not None:
            self.on_trouble(error)

    def _backoff(self, failures: int, retry_after: float | None) -> float:
        delay = self.schedule.backoff_first * 2.0 ** min(failures - 1, 30)
        return max(min(delay, self.schedule.backoff_max), retry_after or 0.0)

    def _next_wake(self) -> float:
        until_report = self._report_due - self.clock()
        return max(MIN_WAIT, min(self.schedule.collect_every, until_report))
