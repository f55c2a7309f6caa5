"""The message catalogue: every sentence a person reads, keyed by stable id, Japanese and English.

Loaded once at start-up from messages.yaml (validated: every entry has both languages).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from policies.yaml_source import Position, SourceError, SourceErrors, read_yaml

LANGUAGES = ("ja", "en")  # Japanese first: it is the default
DEFAULT_CATALOGUE = Path(__file__).with_name("messages.yaml")
# A code without its own entry reads as its family's default rather than the generic error, so a
# new `target-…` code still tells the reader the address was the problem (prefix → default id).
FAMILY_DEFAULTS = (
    ("target-", "target-invalid"),
    ("host-", "target-invalid"),
    ("upstream-", "upstream-unavailable"),
)


@dataclass(frozen=True, slots=True)
class Message:
    """One message in one language: a title, why it happened, and what the reader can do."""

    title: str
    explain: str = ""
    fix: str = ""


class Catalogue:
    """Messages by id and language; an unknown id reads as its family's, else `gateway-error`."""

    def __init__(self, messages: dict[str, dict[str, Message]]) -> None:
        self._messages = messages

    def get(self, message_id: str, language: str) -> Message:
        entry = self._messages.get(message_id)
        if entry is None:
            family = next((d for p, d in FAMILY_DEFAULTS if message_id.startswith(p)), "")
            entry = self._messages.get(family) or self._messages["gateway-error"]
        return entry.get(language) or entry["ja"]

    def ids(self) -> frozenset[str]:
        return frozenset(self._messages)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._messages


def load_catalogue(path: Path = DEFAULT_CATALOGUE) -> Catalogue:
    """Read and check the catalogue; SourceErrors names every incomplete entry."""
    document = read_yaml(path)
    errors: list[SourceError] = []
    messages: dict[str, dict[str, Message]] = {}
    if not isinstance(document.data, dict):
        raise SourceErrors([SourceError(Position(str(path), 1, 1), "expected a mapping of ids")])
    for message_id, entry in document.data.items():
        where = document.position_of((message_id,), key=True)
        if not isinstance(entry, dict) or set(entry) != set(LANGUAGES):
            errors.append(SourceError(where, f"'{message_id}' needs exactly: ja, en"))
            continue
        languages: dict[str, Message] = {}
        for language in LANGUAGES:
            texts = entry[language]
            if not isinstance(texts, dict) or not isinstance(texts.get("title"), str):
                errors.append(SourceError(where, f"'{message_id}.{language}' needs a title"))
                continue
            unknown = set(texts) - {"title", "explain", "fix"}
            if unknown:
                errors.append(SourceError(where, f"'{message_id}.{language}': unknown {unknown}"))
                continue
            languages[language] = Message(
                texts["title"], texts.get("explain", ""), texts.get("fix", "")
            )
        messages[message_id] = languages
    if "gateway-error" not in messages:
        errors.append(SourceError(Position(str(path), 1, 1), "'gateway-error' must exist"))
    if errors:
        raise SourceErrors(errors)
    return Catalogue(messages)


def preferred_language(accept_language: bytes | None) -> str:
    """The best of our languages for an Accept-Language header (RFC 9110 §12.5.4); ja by default."""
    if not accept_language:
        return "ja"
    best, best_q = "ja", -1.0
    for position, item in enumerate(accept_language.decode("latin-1").split(",")[:20]):
        tag, _, params = item.strip().partition(";")
        language = tag.strip().lower().split("-", 1)[0]
        if language not in LANGUAGES:
            continue
        quality = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                quality = float(params[2:])
            except ValueError:
                continue
        # Earlier entries win ties, as browsers list them in preference order.
        if quality > best_q or (quality == best_q and position == 0):
            best, best_q = language, quality
    return best if best_q > 0 else "ja"
