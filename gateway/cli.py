"""`tabiji …`: the command line (serve, check-config, reload, demo, sessions, keys, audit, devices).

Exit codes: 0 ok, 1 a check failed, 2 usage error. Reads settings (with gateway.app, the only
modules that do) and turns them into the serving options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.settings import CONFIG_ENV, GatewaySettings, load_settings
from policies.yaml_source import SourceErrors

if TYPE_CHECKING:
    from gateway.serving import ServeOptions

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _config_path(value: str | None) -> Path | None:
    chosen = value or os.environ.get(CONFIG_ENV)
    return Path(chosen) if chosen else None


def _load_or_report(path: Path, as_json: bool = False) -> GatewaySettings | None:
    try:
        return load_settings(path)
    except SourceErrors as errors:
        if as_json:
            print(
                json.dumps(
                    {
                        "ok": False,
                        "errors": [
                            {
                                "file": e.position.source,
                                "line": e.position.line,
                                "column": e.position.column,
                                "message": e.message,
                                "hint": e.hint,
                            }
                            for e in errors.errors
                        ],
                    },
                    ensure_ascii=False,
                )
            )
        else:
            for error in errors.errors:
                print(error, file=sys.stderr)
            count = len(errors.errors)
            print(f"{count} problem{'s' if count != 1 else ''} in {path}", file=sys.stderr)
        return None


def serve_options(
    settings: GatewaySettings, config_path: Path, workers: int | None
) -> ServeOptions:
    """The serving layer's options, from settings (plus the CLI's overrides)."""
    from gateway.protocol import ProtocolLimits
    from gateway.serving import ServeOptions

    server = settings.server
    metrics_listen = settings.metrics.listen
    return ServeOptions(
        host=settings.listen.host,
        port=settings.listen.port,
        workers=workers or server.workers,
        ssl_certfile=str(settings.tls.cert) if settings.tls else None,
        ssl_keyfile=str(settings.tls.key) if settings.tls else None,
        limits=ProtocolLimits(
            max_head_bytes=int(server.max_head_bytes),
            max_header_count=server.max_headers,
            head_timeout=server.head_timeout,
        ),
        keep_alive_timeout=max(1, round(server.keep_alive_timeout)),
        graceful_shutdown_seconds=round(server.graceful_shutdown),
        limit_concurrency=server.max_concurrency,
        metrics_host=metrics_listen.host if metrics_listen else "127.0.0.1",
        metrics_port=metrics_listen.port if metrics_listen else None,
        log_level=settings.logging.level,
        config_path=str(config_path.resolve()),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    path = _config_path(args.config)
    if path is None:
        print(f"give --config FILE or set {CONFIG_ENV}", file=sys.stderr)
        return EXIT_USAGE
    settings = _load_or_report(path)
    if settings is None:
        return EXIT_FAILED
    from gateway.serving import serve

    return serve(serve_options(settings, path, args.workers))


def cmd_check_config(args: argparse.Namespace) -> int:
    path = Path(args.file)
    settings = _load_or_report(path, args.json)
    if settings is None:
        return EXIT_FAILED
    # Build every object the gateway would build, so nothing fails later at start-up.
    from gateway.app import build_app

    build_app(settings, dry_run=True)
    names = [route.name for route in settings.routes]
    if args.json:
        print(json.dumps({"ok": True, "routes": names}, ensure_ascii=False))
    else:
        print(f"{path}: OK — {len(names)} route(s): {', '.join(names)}")
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    """Check the policy directory and, only if it is clean, tell every worker to load it."""
    from gateway.policy_reload import RELOAD_STAMP
    from policies.loader import load_policy_dir

    path = _config_path(args.config)
    if path is None:
        print(f"give --config FILE or set {CONFIG_ENV}", file=sys.stderr)
        return EXIT_USAGE
    settings = _load_or_report(path, args.json)  # lints the policies and the routes' references
    if settings is None:
        return EXIT_FAILED
    if settings.policies is None:
        print(f"{path}: no `policies:` directory is configured; nothing to reload", file=sys.stderr)
        return EXIT_FAILED
    policy_set = load_policy_dir(settings.policies.dir)
    stamp = settings.policies.dir / RELOAD_STAMP
    # Every worker of every replica sharing this directory watches for this file changing.
    stamp.write_text(f"{policy_set.content_hash}\n", encoding="utf-8")
    if args.json:
        print(json.dumps({"ok": True, "policy_hash": policy_set.content_hash}))
    else:
        print(
            f"{settings.policies.dir}: OK — policy set {policy_set.content_hash[:16]} "
            f"({len(policy_set.names())} policies); every worker loads it within seconds"
        )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo.run import run_demo

    return run_demo(port=args.port, upstream_port=args.upstream_port, idp_port=args.idp_port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tabiji",
        description="Tabiji (旅路): a zero-trust access gateway. Every request is checked, "
        "then forwarded to the town's internal systems.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the gateway",
        description=(
            "Run the gateway. SIGTERM stops it gracefully: in-flight requests may finish within "
            "server.graceful_shutdown."
        ),
    )
    serve.add_argument("--config", help=f"the gateway's YAML config (default: ${CONFIG_ENV})")
    serve.add_argument("--workers", type=int, help="worker processes (overrides server.workers)")
    serve.set_defaults(handler=cmd_serve)

    check = commands.add_parser(
        "check-config",
        help="validate a config file",
        description=(
            "Validate a config file and report every problem with file:line:column and a hint. "
            "Exit 0 when valid, 1 when not."
        ),
    )
    check.add_argument("file", help="the YAML config to check")
    check.add_argument("--json", action="store_true", help="machine-readable output")
    check.set_defaults(handler=cmd_check_config)

    reload = commands.add_parser(
        "reload",
        help="check the policies and make every worker load them",
        description=(
            "Lint the policy directory named by the config. If it is clean, every worker of "
            "every gateway sharing the directory swaps the new set in (the set in force stays "
            "if a worker finds a problem). Exit 0 when signalled, 1 when the policies have errors."
        ),
    )
    reload.add_argument("--config", help=f"the gateway's YAML config (default: ${CONFIG_ENV})")
    reload.add_argument("--json", action="store_true", help="machine-readable output")
    reload.set_defaults(handler=cmd_reload)

    demo = commands.add_parser(
        "demo",
        help="run a local demo (loopback only)",
        description=(
            "Start the demo identity provider, the demo upstream 「庁内グループウェア」 and the "
            "gateway in front of it, all on 127.0.0.1, with the embedded defaults (SQLite "
            "sessions and audit). Stop with Ctrl-C."
        ),
    )
    demo.add_argument("--port", type=int, default=8080, help="the gateway's port (default 8080)")
    demo.add_argument("--upstream-port", type=int, default=9001, help="the demo app's port")
    demo.add_argument(
        "--idp-port",
        type=int,
        default=None,
        help="the demo identity provider's port (default 9000, else any free port)",
    )
    demo.set_defaults(handler=cmd_demo)

    from gateway.cli_admin import add_admin_parsers
    from gateway.devices.cli import add_devices_parser

    add_admin_parsers(commands)
    add_devices_parser(commands)
    return parser


def cmd_admin(args: argparse.Namespace) -> int:
    """A subcommand that acts on the gateway's shared state: load the config, then run it."""
    path = _config_path(args.config)
    if path is None:
        print(f"give --config FILE or set {CONFIG_ENV}", file=sys.stderr)
        return EXIT_USAGE
    settings = _load_or_report(path, getattr(args, "json", False))
    if settings is None:
        return EXIT_FAILED
    result: int = args.admin_handler(args, settings)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "admin_handler", None) is not None:
        return cmd_admin(args)
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
