"""`tabiji-agent`: the device agent's command line on a staff laptop.

enroll · status · report · run · proof · curl · renew. Light on purpose: the standard library,
httpx and cryptography only — never the gateway's server stack (a laptop installs `tabiji` without
the `gateway` extra); each command imports what it uses. Every sentence printed comes from the
catalogue in device_agent/messages.py (Japanese by default, English with --lang en or an English
locale). Exit codes: 0 ok, 1 failed or refused, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Final

from device_agent.messages import MESSAGES, default_language, localised, say
from device_agent.state import AgentState, Enrolment, LastReport, StateError, state_dir

if TYPE_CHECKING:
    from device_agent.client import GatewayError
    from device_agent.device import EnrolledDevice
    from device_agent.report import PostureFacts

__all__ = ["MESSAGES", "main", "state_dir"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PROBE_TIMEOUT: Final = 10.0
_METHOD: Final = re.compile(r"[A-Za-z]{1,20}")
_NETWORK_CODES: Final = {
    "gateway-unreachable",
    "gateway-timeout",
    "gateway-unavailable",
    "rate-limited",
}
_URL_CODES: Final = {
    "gateway-url-invalid",
    "gateway-url-insecure",
    "gateway-ca-file-unreadable",
    "gateway-tls-untrusted",
}


def _version() -> str:
    try:
        return version("tabiji")
    except PackageNotFoundError:
        return "unknown"


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()


def _out(text: str) -> None:
    print(text, flush=True)


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- turning failures into sentences ------------------------------------------------------------


def explain(error: Exception, language: str, gateway: str = "") -> str:
    """One catalogue sentence for any failure the commands expect (never a traceback)."""
    from device_agent.client import GatewayError
    from device_agent.device import NotEnrolled
    from device_agent.keys import KeyStoreError

    if isinstance(error, GatewayError):
        return _explain_gateway(error, language, gateway)
    if isinstance(error, KeyStoreError):
        key_text = "key-missing" if error.code == "key-missing" else "key-error"
        return say(key_text, language, path=error.detail, code=error.code, detail=error.detail)
    if isinstance(error, StateError):
        return say("unreadable", language, path=error.path)
    if isinstance(error, NotEnrolled):
        missing = (
            "unconfirmed-error" if error.code == "enrolment-unconfirmed" else "not-enrolled-error"
        )
        return say(missing, language, gateway=error.gateway or gateway)
    return str(error)


def _explain_gateway(error: GatewayError, language: str, gateway: str) -> str:
    if error.code in _URL_CODES:
        return say(error.code, language, detail=error.detail)
    if error.code in _NETWORK_CODES or error.retryable:
        return say("gateway-unreachable", language, gateway=gateway, code=error.code)
    if error.code.startswith("gateway-"):
        return say("gateway-answer-bad", language, code=error.code)
    message = localised(error.message, language) or say("refusal-unexplained", language)
    return say("gateway-refused", language, message=message, code=error.code)


def _expected_errors() -> tuple[type[Exception], ...]:
    from device_agent.client import GatewayError
    from device_agent.device import NotEnrolled
    from device_agent.keys import KeyStoreError

    return (GatewayError, KeyStoreError, StateError, NotEnrolled)


def open_device(state: AgentState) -> EnrolledDevice:
    """The enrolled device: record, key and a client for its gateway; NotEnrolled otherwise."""
    from device_agent.client import GatewayClient
    from device_agent.device import EnrolledDevice, NotEnrolled
    from device_agent.keys import KeyStoreError, open_key_store

    enrolment = state.load_enrolment()
    if enrolment is None:
        raise NotEnrolled("not-enrolled")
    if enrolment.device_id is None:
        raise NotEnrolled("enrolment-unconfirmed", enrolment.gateway)
    key = open_key_store(state.key_directory).load()
    if key is None:
        raise KeyStoreError("key-missing", str(state.key_directory))
    ca_file = Path(enrolment.ca_file) if enrolment.ca_file else None
    client = GatewayClient(
        enrolment.gateway, ca_file=ca_file, user_agent=f"tabiji-agent/{_version()}"
    )
    return EnrolledDevice(state=state, enrolment=enrolment, key=key, client=client)


def collect_facts(timeout: float = PROBE_TIMEOUT) -> PostureFacts:
    """This machine's posture, from the probes for its OS (TABIJI_AGENT_FACTS_FILE overrides)."""
    from dataclasses import replace

    from device_agent.probes import probe_for_platform

    facts = probe_for_platform().collect(timeout)
    # Which agent sent the facts helps IT tell an old agent's gap from a device's.
    return facts if facts.agent_version else replace(facts, agent_version=_version()[:40])


# -- status -------------------------------------------------------------------------------------


def _report_lines(last: LastReport, language: str) -> list[str]:
    when = _when(last.at)
    if not last.accepted:
        message = localised(last.message, language) or say("refusal-unexplained", language)
        return [say("report-refused", language, when=when, message=message, code=last.error or "-")]
    lines = [say("report-accepted", language, when=when)]
    if not last.reasons and not last.fixes:
        lines.append(say("report-all-good", language))
        return lines
    lines.append(say("report-fixes", language))
    explained = {fix.code for fix in last.fixes}
    for fix in last.fixes:
        title, advice = localised(fix.title, language), localised(fix.fix, language)
        lines.append(f"  ・{_sentences(title, advice, language)}")
    lines.extend(f"  ・{reason}" for reason in last.reasons if reason not in explained)
    return lines


def _sentences(first: str, second: str, language: str) -> str:
    """Two sentences joined as the language writes them ("…無効です。設定 → …", "… off. Open …")."""
    if not first or not second:
        return first or second
    if language == "ja":
        return first + ("" if first.endswith(("。", "！", "？")) else "。") + second
    return first + ("" if first.endswith((".", "!", "?")) else ".") + " " + second


def _status_data(
    state: AgentState, enrolment: Enrolment | None, last: LastReport | None
) -> dict[str, object]:
    data: dict[str, object] = {"enrolled": False, "state_dir": str(state.directory)}
    if enrolment is not None:
        data.update(
            enrolled=enrolment.device_id is not None,
            gateway=enrolment.gateway,
            status=enrolment.status,
            device_id=enrolment.device_id,
            key_storage=enrolment.key_storage,
            certificate_not_after=_certificate_not_after(enrolment),
        )
    if last is not None:
        data["last_report"] = last.to_json()
    return data


def _certificate_not_after(enrolment: Enrolment) -> int | None:
    if enrolment.certificate is None:
        return None
    from cryptography import x509

    try:
        certificate = x509.load_pem_x509_certificate(Path(enrolment.certificate).read_bytes())
    except (OSError, ValueError):
        return None
    return int(certificate.not_valid_after_utc.timestamp())


def cmd_status(args: argparse.Namespace) -> int:
    language = args.lang or default_language()
    state = AgentState()
    try:
        enrolment = state.load_enrolment()
        last = state.load_last_report()
    except StateError as error:
        _err(say("unreadable", language, path=error.path))
        return EXIT_FAILED
    data = _status_data(state, enrolment, last)
    if args.json:
        _out(json.dumps(data, ensure_ascii=False))
        return EXIT_OK
    if enrolment is None:
        _out(say("not-enrolled", language))
        _out(say("enrol-hint", language))
        _out(say("state-dir", language, path=state.directory))
        return EXIT_OK
    headline = {
        "waiting-for-user": "status-waiting",
        "pending": "status-pending",
        "approved": "enrolled",
        "revoked": "status-revoked",
    }[enrolment.status]
    _out(say(headline, language, device_id=enrolment.device_id, gateway=enrolment.gateway))
    if enrolment.status == "waiting-for-user" and enrolment.confirm_url:
        _out(f"  {enrolment.confirm_url}")
    _out(say("status-gateway", language, gateway=enrolment.gateway))
    _out(say("key-tpm" if enrolment.key_storage == "tpm" else "key-software", language))
    not_after = data.get("certificate_not_after")
    if isinstance(not_after, int):
        _out(say("certificate-until", language, when=_when(not_after)))
    if enrolment.device_id is not None:
        lines = [say("no-report", language)] if last is None else _report_lines(last, language)
        for line in lines:
            _out(line)
    return EXIT_OK


# -- enroll -------------------------------------------------------------------------------------


def open_browser(url: str) -> bool:
    """Open the link in the desktop's browser; False (print only) on a text console, where
    Python's webbrowser would start lynx or w3m in the user's terminal."""
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        return False
    import webbrowser

    try:
        return webbrowser.open(url)
    except webbrowser.Error:
        return False


def cmd_enroll(args: argparse.Namespace) -> int:
    from device_agent.client import GatewayClient
    from device_agent.enrolment import Enroller, EnrolmentFailed
    from device_agent.keys import open_key_store

    language = args.lang or default_language()

    def tell(message_id: str, **values: object) -> None:
        _out(str(values["text"]) if message_id == "raw" else say(message_id, language, **values))

    state = AgentState()
    gateway = args.gateway
    ca_file = Path(args.ca_file) if args.ca_file else None
    try:
        state.ensure()
        client = GatewayClient(gateway, ca_file=ca_file, user_agent=f"tabiji-agent/{_version()}")
        gateway = client.origin
        with client:
            enroller = Enroller(
                state=state,
                key_store=open_key_store(state.key_directory),
                client=client,
                tell=tell,
                open_browser=None if args.no_browser else open_browser,
                ca_file=ca_file,
                replace=args.replace,
            )
            record = enroller.run()
    except EnrolmentFailed as failure:
        message_id = {"already-enrolled": "enrol-already"}.get(
            failure.code, f"enrol-{failure.code.removeprefix('enrolment-')}"
        )
        _err(say(message_id, language, **failure.values))
        return EXIT_FAILED
    except _expected_errors() as error:
        _err(explain(error, language, gateway))
        return EXIT_FAILED
    except KeyboardInterrupt:
        _err(say("enrol-interrupted", language, gateway=gateway))
        return EXIT_FAILED
    _out(say(f"enrol-{record.status}", language, device_id=record.device_id))
    _out(say("enrol-next", language))
    return EXIT_OK


# -- report, renew, proof -----------------------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    language = args.lang or default_language()
    state = AgentState()
    gateway = ""
    try:
        device = open_device(state)
        gateway = device.origin
        with device.client:
            last = device.send_report(collect_facts())
    except _expected_errors() as error:
        _err(explain(error, language, gateway))
        return EXIT_FAILED
    for line in _report_lines(last, language):
        _out(line)
    return EXIT_OK if last.accepted and not last.reasons else EXIT_FAILED


def cmd_renew(args: argparse.Namespace) -> int:
    language = args.lang or default_language()
    state = AgentState()
    gateway = ""
    try:
        device = open_device(state)
        gateway = device.origin
        if device.enrolment.status != "approved":
            _err(say("renew-not-approved", language))
            return EXIT_FAILED
        with device.client:
            device.renew_certificate()
        window = device.certificate_window()
    except _expected_errors() as error:
        _err(explain(error, language, gateway))
        return EXIT_FAILED
    _out(say("renew-done", language, when=_when(window[1]) if window else "-"))
    return EXIT_OK


def cmd_proof(args: argparse.Namespace) -> int:
    language = args.lang or default_language()
    if not _METHOD.fullmatch(args.method) or not args.url.startswith(("https://", "http://")):
        _err(say("curl-no-url", language))
        return EXIT_USAGE
    try:
        device = open_device(AgentState())
        with device.client:  # no request is made: the proof is signed here
            _out(device.proof(args.method.upper(), proof_target(args.url)))
    except _expected_errors() as error:
        _err(explain(error, language))
        return EXIT_FAILED
    return EXIT_OK


def proof_target(url: str) -> str:
    """The URL as curl and browsers send it: an origin alone means its root path "/"."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return url if parts.path else url.replace(parts.netloc, parts.netloc + "/", 1)


# -- curl ---------------------------------------------------------------------------------------

# curl's options that take a value (curl 7.88 `curl --help all`): their values are skipped when
# looking for -X, so `-d -X` is data, not a method.
_CURL_SHORT_WITH_VALUE: Final = frozenset("AbcCdDeEFHKmoPQrtTuUwxXyYz")
_CURL_LONG_WITH_VALUE: Final = frozenset(
    {
        "--request",
        "--header",
        "--data",
        "--data-raw",
        "--data-binary",
        "--data-urlencode",
        "--data-ascii",
        "--json",
        "--form",
        "--form-string",
        "--output",
        "--user",
        "--user-agent",
        "--referer",
        "--cookie",
        "--cookie-jar",
        "--upload-file",
        "--proxy",
        "--write-out",
        "--config",
        "--cert",
        "--key",
        "--cacert",
        "--capath",
        "--range",
        "--max-time",
        "--connect-timeout",
        "--resolve",
        "--connect-to",
        "--url",
        "--retry",
        "--dump-header",
        "--oauth2-bearer",
        "--proxy-user",
        "--limit-rate",
        "--interface",
        "--tls-max",
        "--ciphers",
        "--pinnedpubkey",
        "--cert-type",
        "--key-type",
        "--max-filesize",
    }
)
_CURL_BODY: Final = frozenset(
    {
        "--data",
        "--data-raw",
        "--data-binary",
        "--data-urlencode",
        "--data-ascii",
        "--json",
        "--form",
        "--form-string",
        "-d",
        "-F",
    }
)


def _curl_options(args: Sequence[str]) -> Iterator[tuple[str, str | None]]:
    """(option, value) pairs as curl reads them: `-XPOST`, `-X POST`, `-sSL`, `--request POST`
    (curl's long options take their value as the next argument, never after "=")."""
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg.startswith("--"):
            value = None
            if arg in _CURL_LONG_WITH_VALUE:
                value = args[index] if index < len(args) else ""
                index += 1
            yield arg, value
        elif arg.startswith("-") and arg != "-":
            for position, flag in enumerate(arg[1:], start=1):
                if flag not in _CURL_SHORT_WITH_VALUE:
                    yield f"-{flag}", None
                    continue
                value = arg[position + 1 :]
                if not value:
                    value = args[index] if index < len(args) else ""
                    index += 1
                yield f"-{flag}", value
                break


def curl_method(args: Sequence[str]) -> str:
    """The method curl will use: -X/--request, else what -I, -G, -T or a body imply, else GET."""
    explicit: str | None = None
    implied, forced_get = "GET", False
    for option, value in _curl_options(args):
        if option in ("-X", "--request"):
            explicit = value
        elif option in ("-I", "--head"):
            implied = "HEAD"
        elif option in ("-G", "--get"):
            forced_get = True  # -G sends the body as the query string
        elif option in ("-T", "--upload-file") and implied == "GET":
            implied = "PUT"
        elif option in _CURL_BODY and implied == "GET":
            implied = "POST"
    if explicit:
        return explicit.upper()
    return "GET" if forced_get and implied != "HEAD" else implied


def curl_command(
    args: Sequence[str], proof: Callable[[str, str], str], curl: str = "curl"
) -> list[str]:
    """curl's argv with `-H "DPoP: <proof>"` for the method and URL (the last argument)."""
    if not args or not args[-1].startswith(("https://", "http://")):
        raise ValueError("curl-no-url")
    url = args[-1]
    value = proof(curl_method(args[:-1]), proof_target(url))
    return [curl, *args[:-1], "-H", f"DPoP: {value}", url]


def cmd_curl(raw_args: Sequence[str]) -> int:
    language = default_language()
    executable = shutil.which("curl")
    if executable is None:
        _err(say("curl-missing", language))
        return EXIT_FAILED
    try:
        device = open_device(AgentState())
        with device.client:
            argv = curl_command(list(raw_args), device.proof, executable)
    except ValueError:
        _err(say("curl-no-url", language))
        return EXIT_USAGE
    except _expected_errors() as error:
        _err(explain(error, language))
        return EXIT_FAILED
    return subprocess.run(argv, check=False).returncode  # noqa: S603 — the user's own curl arguments


# -- run ----------------------------------------------------------------------------------------


def parse_ports(text: str) -> tuple[int, ...]:
    start, _, end = text.partition("-")
    try:
        first, last = int(start), int(end or start)
    except ValueError as error:
        raise argparse.ArgumentTypeError(say("usage-ports", default_language())) from error
    if not 1024 <= first <= last <= 65535 or last - first > 15:
        raise argparse.ArgumentTypeError(say("usage-ports", default_language()))
    return tuple(range(first, last + 1))


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 1 <= value <= 1440:
        raise argparse.ArgumentTypeError(say("usage-interval", default_language()))
    return value


def _check_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 1 <= value <= 3600:
        raise argparse.ArgumentTypeError(say("usage-check-every", default_language()))
    return value


def cmd_run(args: argparse.Namespace) -> int:
    import logging

    from device_agent.loopback import LoopbackServer, LoopbackUnavailable
    from device_agent.runner import Runner, Schedule

    language = args.lang or default_language()
    # People read the catalogue sentences below; the log keeps warnings (e.g. a facts override).
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    state = AgentState()
    try:
        device = open_device(state)
    except _expected_errors() as error:
        _err(explain(error, language))
        return EXIT_FAILED
    if device.enrolment.status == "revoked":
        _err(say("run-refused", language, code="device-revoked"))
        return EXIT_FAILED
    server = LoopbackServer(
        origin=device.origin, device_id=device.device_id, attest=device.attest, ports=args.ports
    )
    port: int | None
    try:
        port = server.start()
    except LoopbackUnavailable:
        port = None
        _err(say("run-no-loopback", language, ports=f"{args.ports[0]}-{args.ports[-1]}"))
    _out(say("run-started", language, gateway=device.origin, port=port or "-"))
    shown: list[object] = [None]  # the last outcome said: say it again only when it changes

    def on_report(last: LastReport) -> None:
        outcome = (last.accepted, last.reasons, last.error)
        if shown[-1] != outcome:
            shown.append(outcome)
            for line in _report_lines(last, language):
                _out(line)

    def on_trouble(error: Exception) -> None:
        if shown[-1] != getattr(error, "code", None):
            shown.append(getattr(error, "code", None))
            _err(explain(error, language, device.origin))

    runner = Runner(
        device,
        collect_facts,
        schedule=Schedule(report_every=args.interval * 60, collect_every=args.check_every),
        loopback_port=port,
        on_report=on_report,
        on_trouble=on_trouble,
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        runner.stop()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with device.client:
            last = runner.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.stop()
    if last is not None and last.error in ("device-revoked", "device-unknown"):
        _err(say("run-refused", language, code=last.error))
        return EXIT_FAILED
    _out(say("run-stopped", language))
    return EXIT_OK


# -- the parser ---------------------------------------------------------------------------------


def build_parser(language: str) -> argparse.ArgumentParser:
    def text(key: str) -> str:
        return say(key, language)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--lang", choices=["ja", "en"], help=text("help-lang"))
    parser = argparse.ArgumentParser(prog="tabiji-agent", description=text("description"))
    parser.add_argument("--version", action="version", version=f"tabiji-agent {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    enroll = commands.add_parser("enroll", parents=[common], help=text("help-enroll"))
    enroll.add_argument("gateway", metavar="URL", help=text("help-gateway"))
    enroll.add_argument("--ca-file", metavar="FILE", help=text("help-ca-file"))
    enroll.add_argument("--no-browser", action="store_true", help=text("help-no-browser"))
    enroll.add_argument("--replace", action="store_true", help=text("help-replace"))
    enroll.set_defaults(handler=cmd_enroll)

    status = commands.add_parser("status", parents=[common], help=text("help-status"))
    status.add_argument("--json", action="store_true", help=text("help-json"))
    status.set_defaults(handler=cmd_status)

    report = commands.add_parser("report", parents=[common], help=text("help-report"))
    report.set_defaults(handler=cmd_report)

    run = commands.add_parser("run", parents=[common], help=text("help-run"))
    run.add_argument(
        "--ports", type=parse_ports, default=tuple(range(47801, 47806)), help=text("help-ports")
    )
    run.add_argument(
        "--interval", type=_minutes, default=5.0, metavar="MINUTES", help=text("help-interval")
    )
    run.add_argument(
        "--check-every",
        type=_check_seconds,
        default=30.0,
        metavar="SECONDS",
        help=text("help-check-every"),
    )
    run.set_defaults(handler=cmd_run)

    proof = commands.add_parser("proof", parents=[common], help=text("help-proof"))
    proof.add_argument("method", metavar="METHOD", help=text("help-method"))
    proof.add_argument("url", metavar="URL", help=text("help-url"))
    proof.set_defaults(handler=cmd_proof)

    curl = commands.add_parser("curl", help=text("help-curl"))
    curl.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help=text("help-curl-args"))

    renew = commands.add_parser("renew", parents=[common], help=text("help-renew"))
    renew.set_defaults(handler=cmd_renew)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["curl"] and arguments[1:2] not in (["-h"], ["--help"]):
        # Everything after `curl` belongs to curl (argparse would take -X or -H as ours).
        return cmd_curl(arguments[1:])
    parser = build_parser(default_language())
    try:
        args = parser.parse_args(arguments)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    if args.command is None or not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_USAGE
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
