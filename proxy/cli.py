"""The ``sipguard`` command: run, check, demo."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from datetime import datetime

import structlog
import uvloop

from .app import ProxySettings, SipGuard
from .engine import PolicyEngine
from .logs import configure_logging
from .policyfile import CompiledPolicy, PolicyFileError, default_policy, load_policy
from .sip.events import parse_address
from .state import MemoryStore, StateStore
from .state.redis_store import RedisStore

log = structlog.get_logger("sipguard")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sipguard", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the proxy")
    run.add_argument("--config", metavar="FILE", help="policy file (YAML); flags override its proxy: section")
    run.add_argument(
        "--listen", action="append", metavar="URI", help="udp:HOST:PORT or tcp:HOST:PORT (repeat)"
    )
    run.add_argument("--upstream", metavar="URI", help="the PBX: udp:HOST:PORT or tcp:HOST:PORT")
    run.add_argument(
        "--wall-clock",
        metavar="ISO8601",
        type=_instant,
        help="pretend the wall clock reads this at start, e.g. 2026-11-23T21:30:00+00:00 "
        "(for trying calendar rules such as calling hours and daily quotas; tests use it)",
    )
    _logging_flags(run, "info")
    check = commands.add_parser("check", help="validate a policy file and summarise it")
    check.add_argument("file", metavar="FILE")
    demo = commands.add_parser(
        "demo",
        help="the policy at work: SIPp callers, sipguard, a stand-in PBX (loopback)",
        description="sipguard with its demo policy in front of a stand-in PBX (SIPp), on loopback: "
        "legitimate calls, a spoofed caller ID, a trunking burst, a dialer burst and emergency calls, "
        "each set beside what the policy should do. Exits 1 when a scenario differs. The decision log "
        "is written as JSON lines to a file in a temporary directory (its path is printed); "
        "--log-format console also shows it on stderr.",
    )
    _logging_flags(demo, "debug")
    return parser


def _instant(text: str) -> float:
    """An ISO 8601 date and time with its UTC offset, as epoch seconds."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no UTC offset (add +00:00 or Z)")
    return moment.timestamp()


def _logging_flags(parser: argparse.ArgumentParser, level: str) -> None:
    parser.add_argument("--log-level", default=level, choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return check_command(args.file)
    if args.command == "demo":
        from .demo import run_demo

        try:
            return uvloop.run(run_demo(args.log_level, args.log_format))
        except KeyboardInterrupt:  # its SIPp processes are ended on the way out
            return 130
    configure_logging(args.log_level, args.log_format)
    try:
        policy = load_policy(args.config) if args.config else default_policy()
        settings = ProxySettings.from_policy(
            policy,
            listen=[parse_address(uri) for uri in args.listen] if args.listen else None,
            upstream=parse_address(args.upstream) if args.upstream else None,
        )
    except PolicyFileError as error:
        print(error, file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"sipguard: {error}", file=sys.stderr)
        return 2
    return uvloop.run(_serve(settings, policy, args.config, args.wall_clock))


def build_store(policy: CompiledPolicy) -> StateStore:
    """The state store the policy file names: this process's memory, or a shared Redis."""
    state = policy.state
    if state.url == "memory":
        return MemoryStore(slot_lease=policy.local_slot_lease)
    return RedisStore(state.url, slot_lease=state.lease, timeout=state.timeout)


async def _serve(
    settings: ProxySettings, policy: CompiledPolicy, path: str | None, wall_clock: float | None = None
) -> int:
    monotonic = asyncio.get_running_loop().time()
    engine = PolicyEngine(policy, build_store(policy), wall_offset=(wall_clock or time.time()) - monotonic)
    for warning in policy.warnings:
        log.warning("policy.warning", detail=warning)

    def reload() -> None:
        if path is None:
            log.warning("policy.reload_skipped", reason="no --config file")
            return
        try:
            new = load_policy(path)
        except PolicyFileError as error:
            log.error("policy.reload_failed", path=path, errors=error.errors, kept=engine.policy.path)
            return
        if new.proxy != engine.policy.proxy or new.state != engine.policy.state:
            log.warning("policy.restart_needed", detail="proxy: and state: changes apply after a restart")
        engine.replace(new)
        log.info(
            "policy.reloaded", path=path, accounts=len(new.accounts), rules=[r.name for r, _ in new.rules]
        )

    guard = SipGuard(settings, engine, reload=reload)
    try:
        await guard.start()
    except OSError as error:
        print(f"sipguard: cannot listen: {error}", file=sys.stderr)
        return 1
    log.info(
        "policy.loaded",
        path=policy.path,
        accounts=len(policy.accounts),
        rules=[r.name for r, _ in policy.rules],
    )
    await guard.run_until_stopped()
    close = getattr(engine.store, "close", None)
    if close is not None:  # a shared store's connections and lease renewal
        await close()
    return 0


def check_command(path: str) -> int:
    """``sipguard check FILE``: errors with file:line on stderr and exit 1, else a summary."""
    try:
        policy = load_policy(path)
    except PolicyFileError as error:
        print(error, file=sys.stderr)
        return 1
    print(f"{path}: OK")
    print(f"proxy: listen {', '.join(policy.proxy.listen)}; upstream {policy.proxy.upstream}; "
          f"trusted {', '.join(policy.proxy.trusted_peers) or 'none'}")  # fmt: skip
    print(
        f"numbering: default region {policy.region}; emergency {', '.join(sorted(policy.emergency.numbers))}"
    )
    print(f"\nrules ({len(policy.rules)}), in the order they run:")
    for rule, config in policy.rules:
        settings = config.model_dump(exclude={"mode", "reply"}, exclude_none=True)
        shown = ", ".join(f"{key}={value}" for key, value in settings.items())
        reply = f"reply {config.reply.code} {config.reply.reason!r}"
        print(f"  {rule.name:<12} {config.mode.value:<8} {reply}  {shown}")
        for line in rule.describe(config):  # what it loaded: list sizes
            print(f"      {line}")
    print(f"\naccounts ({len(policy.accounts)}):")
    for name, account in policy.accounts.items():
        sources = [str(net) for net, owner in policy.networks if owner == name]
        print(f"  {name}: region {account.region}; sources {', '.join(sources) or 'none'}; "
              f"owns {account.numbers.describe()} ({len(account.numbers)} numbers)"
              f"{'; telemarketing' if account.telemarketing else ''}")  # fmt: skip
        defaults = {rule.name: config.model_dump(mode="json") for rule, config in policy.rules}
        for rule, config in policy.account_rules.get(name, ()):
            default = defaults.get(rule.name, {})
            changed = {k: v for k, v in config.model_dump(mode="json").items() if default.get(k) != v}
            if changed:
                print(f"    {rule.name}: " + ", ".join(f"{key}={value}" for key, value in changed.items()))
                for line in rule.describe(config):
                    print(f"      {line}")
    if policy.warnings:
        print(f"\nwarnings ({len(policy.warnings)}):")
        for warning in policy.warnings:
            print(f"  {warning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
