"""Fixture access and a runner that replays recorded command outputs to the probes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from device_agent.probes.base import CommandResult

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> str:
    """A fixture's text exactly as stored (Windows outputs keep their CRLF)."""
    with (FIXTURES / name).open(encoding="utf-8", newline="") as stream:
        return stream.read()


@dataclass(frozen=True)
class Answer:
    """One recorded run of a command."""

    stdout: str = ""
    stderr: str = ""
    returncode: int = 0


@dataclass
class ReplayRunner:
    """Answers the recorded commands; any other command is absent, as if not installed."""

    answers: Mapping[tuple[str, ...], Answer]
    calls: list[tuple[str, ...]] = field(default_factory=list)

    def __call__(self, argv: Sequence[str], timeout: float) -> CommandResult | None:
        self.calls.append(tuple(argv))
        answer = self.answers.get(tuple(argv))
        if answer is None:
            return None
        return CommandResult(answer.returncode, answer.stdout, answer.stderr)

    def ran(self, program: str) -> bool:
        return any(call[0] == program for call in self.calls)
