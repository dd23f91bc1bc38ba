"""The ``sipguard`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import uvloop

from .app import ProxySettings, SipGuard
from .logs import configure_logging
from .sip.events import parse_address


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sipguard", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the proxy")
    run.add_argument(
        "--listen", action="append", metavar="URI", help="udp:HOST:PORT or tcp:HOST:PORT (repeat)"
    )
    run.add_argument("--upstream", metavar="URI", help="the PBX: udp:HOST:PORT or tcp:HOST:PORT")
    run.add_argument("--trusted", action="append", default=[], metavar="HOST", help="another PBX-side host")
    run.add_argument("--advertise", metavar="HOST", help="host to put in Via/Record-Route (for 0.0.0.0)")
    run.add_argument("--max-calls", type=int, default=100_000)
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    demo = commands.add_parser("demo", help="sipguard in front of a stand-in PBX, driven by SIPp (loopback)")
    demo.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    demo.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    if args.command == "run":
        try:
            settings = ProxySettings(
                listen=[parse_address(uri) for uri in (args.listen or ["udp:127.0.0.1:5060"])],
                upstream=parse_address(args.upstream or "udp:127.0.0.1:5070"),
                trusted_hosts=frozenset(args.trusted),
                advertise=args.advertise,
                max_calls=args.max_calls,
            )
        except ValueError as error:
            print(f"sipguard: {error}", file=sys.stderr)
            return 2
        return uvloop.run(_serve(settings))
    if args.command == "demo":
        from .demo import run_demo

        return uvloop.run(run_demo())
    return 2


async def _serve(settings: ProxySettings) -> int:
    guard = SipGuard(settings)
    try:
        await guard.start()
    except OSError as error:
        print(f"sipguard: cannot listen: {error}", file=sys.stderr)
        return 1
    await guard.run_until_stopped()
    return 0


if __name__ == "__main__":
    sys.exit(main())
