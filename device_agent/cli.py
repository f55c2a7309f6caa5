"""`tabiji-agent`: the device agent's command line on a staff laptop.

Light on purpose: the standard library, httpx and cryptography only — never the gateway's server
stack (a laptop installs `tabiji` without the `gateway` extra). Enrolment, posture reports and
device proofs arrive with the device-trust release; today the agent can say where it keeps its
state and whether this device is enrolled.
"""

from __future__ import annotations

import argparse
import json
import locale
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# Every sentence the agent prints, Japanese and English side by side (Japanese by default).
MESSAGES: dict[str, dict[str, str]] = {
    "description": {
        "ja": "Tabiji 端末エージェント: この端末を庁内システムの利用に登録し、状態を報告します。",
        "en": "Tabiji device agent: enrols this laptop for the town's systems, reports its state.",
    },
    "not-enrolled": {
        "ja": "この端末はまだ登録されていません。",
        "en": "This device is not enrolled yet.",
    },
    "enrolled": {
        "ja": "この端末は登録済みです（端末 ID: {device_id}）。",
        "en": "This device is enrolled (device id: {device_id}).",
    },
    "state-dir": {"ja": "状態の保存先: {path}", "en": "State directory: {path}"},
    "unreadable": {
        "ja": "登録情報を読み取れません（{path}）。情報政策担当へご連絡ください。",
        "en": "The enrolment record cannot be read ({path}). Please contact IT.",
    },
}


def say(key: str, language: str, **values: object) -> str:
    return MESSAGES[key][language].format(**values)


def state_dir() -> Path:
    """Where the agent keeps its key and enrolment (XDG on Linux; TABIJI_AGENT_HOME overrides)."""
    override = os.environ.get("TABIJI_AGENT_HOME")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tabiji-agent"


def default_language() -> str:
    """Japanese unless the user's locale is English."""
    for variable in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = os.environ.get(variable)
        if value:
            return "en" if value.lower().startswith("en") else "ja"
    found = locale.getlocale()[0] or ""
    return "en" if found.lower().startswith("en") else "ja"


def cmd_status(args: argparse.Namespace) -> int:
    language = args.lang or default_language()
    directory = state_dir()
    record = directory / "enrolment.json"
    status: dict[str, object] = {"enrolled": False, "state_dir": str(directory)}
    if record.exists():
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
            status = {**status, "enrolled": True, "device_id": str(data["device_id"])}
        except (OSError, ValueError, KeyError, TypeError):
            print(say("unreadable", language, path=record), file=sys.stderr)
            return EXIT_FAILED
    if args.json:
        print(json.dumps(status, ensure_ascii=False))
    elif status["enrolled"]:
        print(say("enrolled", language, device_id=status["device_id"]))
    else:
        print(say("not-enrolled", language))
        print(say("state-dir", language, path=directory))
    return EXIT_OK


def build_parser(language: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tabiji-agent", description=say("description", language))
    try:
        installed = version("tabiji")
    except PackageNotFoundError:
        installed = "unknown"
    parser.add_argument("--version", action="version", version=f"tabiji-agent {installed}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    status = commands.add_parser("status", help="enrolment state of this device / 登録状態")
    status.add_argument("--lang", choices=["ja", "en"], help="language (default: locale)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(default_language())
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
