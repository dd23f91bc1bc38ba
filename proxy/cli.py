"""The ``sipguard`` command: run, check, demo; and status, explain, bans, unban, reload,
which ask a running sipguard through its admin listener (proxy/admin_client.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog
import uvloop

from .admin import AdminServer
from .admin_client import (
    TOKEN_VARIABLE,
    bans_command,
    explain_command,
    reload_command,
    status_command,
    unban_command,
)
from .app import ProxySettings, SipGuard
from .engine import PolicyEngine
from .logs import configure_logging
from .policyfile import (
    AdminSection,
    CompiledPolicy,
    FloodSection,
    PolicyFileError,
    default_policy,
    load_policy,
    parse_admin_address,
)
from .reload import Reloader
from .sip.events import parse_address
from .state import MemoryStore, StateStore
from .state.redis_store import RedisStore
from .terminal import duration, table

if TYPE_CHECKING:
    from .replay import ReplayReport

log = structlog.get_logger("sipguard")
DEFAULT_ADMIN = AdminSection().listen or "127.0.0.1:5065"


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
    status = commands.add_parser(
        "status",
        help="live calls, top callers, penalty box, bans, the policy in force",
        description=_admin_help("Exit status: 0 shown, 2 the listener could not be asked."),
    )
    _admin_flags(status)
    explain = commands.add_parser(
        "explain",
        help="why a recent call was refused or let through, and how it went",
        description=_admin_help(
            "Shows every INVITE judged on CALL-ID among the recent decisions (admin.recent_calls) "
            "and the calls still up: the verdict, the deciding rule and reply code, each counter "
            "against its limit, the other rules' findings, and how the call went. "
            "Exit status: 0 explained, 1 the call is not remembered, 2 the listener could not be asked."
        ),
    )
    explain.add_argument("call_id", metavar="CALL-ID", help="the call's Call-ID header")
    _admin_flags(explain)
    bans = commands.add_parser(
        "bans",
        help="list the sources the flood defence has banned",
        description=_admin_help("Exit status: 0 listed, 2 the listener could not be asked."),
    )
    _admin_flags(bans)
    unban = commands.add_parser(
        "unban",
        help="lift a source's flood ban, or take a number or an account out of the penalty box",
        description=_admin_help(
            "An IP address: its flood ban is lifted. A number (E.164, or national in the account's "
            "region, else the policy's default region): it leaves the penalty box and its recent "
            "calls are forgotten. --account NAME: that account leaves the penalty box (with a number: "
            "both). Exit status: 0 done, 1 not banned or not in the penalty box, 2 the listener "
            "could not be asked or the input is not usable."
        ),
    )
    unban.add_argument(
        "target", nargs="?", metavar="ADDRESS|NUMBER", help="an IP address or a telephone number"
    )
    unban.add_argument("--account", metavar="NAME", help="release this account from the penalty box")
    _admin_flags(unban)
    reload = commands.add_parser(
        "reload",
        help="reload the policy file (as SIGHUP does)",
        description=_admin_help(
            "The file is validated whole; a file that does not validate changes nothing and its "
            "errors (file:line) are printed. Exit status: 0 applied, 1 refused (the running policy "
            "stays), 2 the listener could not be asked."
        ),
    )
    _admin_flags(reload)
    _add_replay_parser(commands)
    return parser


def _admin_help(exits: str) -> str:
    return (
        "Asks a running sipguard through its admin listener (the policy file's admin: section). "
        f"The token, if the listener wants one, comes from --token or ${TOKEN_VARIABLE}. {exits}"
    )


def _admin_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin",
        metavar="HOST:PORT",
        default=DEFAULT_ADMIN,
        help=f"admin listener (default {DEFAULT_ADMIN})",
    )
    parser.add_argument("--token", metavar="TOKEN", help=f"bearer token (default: ${TOKEN_VARIABLE})")
    parser.add_argument("--json", action="store_true", help="print the admin listener's JSON as it is")


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
    if args.command == "replay":
        return replay_command(args)
    if args.command == "check":
        return check_command(args.file)
    if args.command in ADMIN_COMMANDS:
        return ADMIN_COMMANDS[args.command](args)
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

    guard = SipGuard(settings, engine)
    guard.wall_clock_skew = wall_clock - time.time() if wall_clock is not None else 0.0
    guard.on_wall_offset = engine.follow_wall_clock  # calendar rules follow a stepped clock
    reloader = Reloader(engine, guard, path)
    guard.on_reload = reloader.on_signal  # SIGHUP
    guard.handle_signals()
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
    admin = await _start_admin(guard, policy.admin, engine, reloader)
    await guard.run_until_stopped()
    if admin is not None:
        await admin.close()
    await engine.close()
    return 0


async def _start_admin(
    guard: SipGuard, section: AdminSection, engine: PolicyEngine, reloader: Reloader
) -> AdminServer | None:
    """The admin listener, if configured. One that cannot bind (its port taken, say by
    another instance) is logged and left out: the proxy serves calls without it."""
    if section.listen is None:
        return None
    host, port = parse_admin_address(section.listen)
    admin = AdminServer(guard, host, port, section.token, engine=engine, reloader=reloader)
    try:
        host, port = await admin.start()
    except OSError as error:
        log.error("admin.cannot_listen", listen=section.listen, error=str(error))
        return None
    log.info("admin.started", host=host, port=port, token=section.token is not None)
    return admin


ADMIN_COMMANDS = {
    "status": lambda args: status_command(args.admin, args.token, as_json=args.json),
    "explain": lambda args: explain_command(args.call_id, args.admin, args.token, as_json=args.json),
    "bans": lambda args: bans_command(args.admin, args.token, as_json=args.json),
    "unban": lambda args: unban_command(args.target, args.account, args.admin, args.token, as_json=args.json),
    "reload": lambda args: reload_command(args.admin, args.token, as_json=args.json),
}


def _describe_flood(flood: FloodSection) -> str:
    if not flood.enabled:
        return "flood: off (every message admitted)"
    exempt = ["trusted peers", "the upstream", *flood.exempt]
    rate = flood.messages_per_second
    return (
        f"flood: {int(rate) if rate.is_integer() else rate} messages/s per source, burst {flood.burst}; "
        f"ban {flood.ban_seconds:g} s, doubling for repeat offenders up to {flood.max_ban_seconds:g} s; "
        f"{len(flood.user_agents)} scanner user agents; exempt {', '.join(exempt)}"
    )


def _describe_admin(admin: AdminSection) -> str:
    if admin.listen is None:
        return "admin: off"
    return (
        f"admin: http://{admin.listen} (commands: status, explain, bans, unban, reload; "
        "GET /metrics; GET /healthz, GET /readyz need no token); "
        f"token {'set' if admin.token else 'none'}; {admin.recent_calls} decisions remembered"
    )


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
    print(_describe_flood(policy.flood))
    print(_describe_admin(policy.admin))
    print(f"\nrules ({len(policy.rules)}), in the order they run:")
    for rule, config in policy.rules:
        settings = config.model_dump(exclude={"mode", "reply"}, exclude_none=True)
        shown = ", ".join(f"{key}={value}" for key, value in settings.items())
        reply = f"reply {config.reply.code} {config.reply.reason!r}"
        print(f"  {rule.name:<12} {config.mode.value:<8} {reply}  {shown}")
        for line in rule.describe(config):  # what it loaded: list sizes
            print(f"      {line}")
    print(f"\naccounts ({len(policy.accounts)}):")
    sources: dict[str, list[str]] = {}  # by account, in one walk: a file may hold 20,000 accounts
    for network, owner in policy.networks:
        sources.setdefault(owner, []).append(str(network))
    defaults = {rule.name: config.model_dump(mode="json") for rule, config in policy.rules}
    for name, account in policy.accounts.items():
        print(f"  {name}: region {account.region}; sources {', '.join(sources.get(name, [])) or 'none'}; "
              f"owns {account.numbers.describe()} ({len(account.numbers)} numbers)"
              f"{'; telemarketing' if account.telemarketing else ''}")  # fmt: skip
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


# -- replay: a policy tried on a capture, offline ---------------------------------------------------
def _add_replay_parser(commands: Any) -> None:
    replay = commands.add_parser(
        "replay",
        help="what a policy would have done with the calls in a capture (pcap, pcapng)",
        description="Judges every call in a capture of SIP traffic (tcpdump or tshark; UDP and TCP, "
        "IPv4 and IPv6; .gz too) by the policy file, offline, with the capture's timestamps as the "
        "clock, and prints per rule and per account the calls it would refuse, with the first "
        "examples. Counters start empty and live in memory: a Redis named by the policy is not "
        "touched. Exit status: 0 done, 2 the policy or the capture cannot be read. See docs/replay.md.",
    )
    replay.add_argument("policy", metavar="POLICY", help="the policy file (YAML) to try")
    replay.add_argument("capture", metavar="CAPTURE", help="a pcap or pcapng file")
    replay.add_argument("--json", action="store_true", help="the report as JSON")
    replay.add_argument(
        "--examples", type=int, default=10, metavar="N", help="refused calls to show (default 10)"
    )
    replay.add_argument("--calls", action="store_true", help="also list every judged call")
    replay.add_argument(
        "--upstream", metavar="URI", help="the PBX (udp:HOST:PORT), if not the policy's proxy.upstream"
    )


def replay_command(args: argparse.Namespace) -> int:
    """``sipguard replay POLICY CAPTURE``: the report on stdout; 2 when an input is unusable."""
    from .capture import CaptureError
    from .replay import replay_capture

    configure_logging("error")  # the report is the output, not the engine's decision lines
    try:
        policy = load_policy(args.policy)
        upstream = parse_address(args.upstream) if args.upstream else None
        report = replay_capture(
            policy, args.capture, upstream=upstream, examples=max(0, args.examples), keep_calls=args.calls
        )
    except PolicyFileError as error:
        print(error, file=sys.stderr)
        return 2
    except (CaptureError, ValueError) as error:
        print(f"sipguard replay: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        _print_replay(report)
    return 0


def _print_replay(report: ReplayReport) -> None:
    from .replay import wall_time

    counts = report.counts
    print(f"replay of {report.capture} ({report.capture_format}, {report.link_type}) against {report.policy}")
    if report.first_at is not None and report.last_at is not None:
        span = duration(report.last_at - report.first_at)
        print(f"capture: {wall_time(report.first_at)} to {wall_time(report.last_at)} ({span})")
    print(f"  {counts.packets} packets: {counts.messages} SIP messages (UDP {counts.udp_messages}, "
          f"TCP {counts.tcp_messages}), {counts.malformed} malformed (skipped), "
          f"{counts.not_sip} without SIP")  # fmt: skip
    for warning in report.warnings:
        print(f"warning: {warning}")
    print(f"\ncalls judged: {report.judged}: {report.accepted} accepted, {report.refused} would be "
          f"refused, {report.emergency} emergency (and {report.from_pbx_side} from the PBX side, "
          "not judged)")  # fmt: skip
    rows: list[tuple[str, ...]] = [("RULE", "JUDGED", "REFUSED", "MONITOR", "TAGGED", "WARNINGS", "REPLY")]
    rows += [(name, str(c.judged), str(c.refused), str(c.monitor), str(c.tagged), str(c.warnings),
              report.replies.get(name, "")) for name, c in report.rules.items()]  # fmt: skip
    if len(rows) > 1:
        print()
        print("\n".join(table(rows, right_aligned={1, 2, 3, 4, 5})))
    rows = [("ACCOUNT", "JUDGED", "ACCEPTED", "REFUSED", "MONITOR", "TAGGED")]
    rows += [(name, str(c.judged), str(c.accepted), str(c.refused), str(c.monitor), str(c.tagged))
             for name, c in sorted(report.accounts.items())]  # fmt: skip
    if len(rows) > 1:
        print()
        print("\n".join(table(rows, right_aligned={1, 2, 3, 4, 5})))
    if report.judged:
        print("\nagainst the capture:")
        print(f"  {report.seen('reject', 'answered')} of the calls it would refuse were answered there")
        print(f"  {report.seen('accept', 'refused')} of the calls it lets through were refused there "
              "(taken as ringing until that refusal)")  # fmt: skip
    if report.examples:
        print(f"\nrefused calls, the first {len(report.examples)} of {report.refused}:")
        rows = [("TIME", "CALL-ID", "ACCOUNT", "CALLER", "CALLEE", "RULE", "DETAIL")]
        rows += [(wall_time(c.at) or "", c.call_id, c.account or "-", c.caller_e164 or c.caller or "-",
                  c.callee or "-", c.rule or "-", c.detail or "") for c in report.examples]  # fmt: skip
        print("\n".join(table(rows, right_aligned=set())))
    if report.calls:
        print(f"\nevery judged call ({len(report.calls)}):")
        rows = [("TIME", "CALL-ID", "ACCOUNT", "CALLER", "CALLEE", "VERDICT", "RULE", "IN THE CAPTURE")]
        rows += [(wall_time(c.at) or "", c.call_id, c.account or "-", c.caller_e164 or c.caller or "-",
                  c.callee or "-", c.verdict, c.rule or "-", c.captured) for c in report.calls]  # fmt: skip
        print("\n".join(table(rows, right_aligned=set())))


if __name__ == "__main__":
    sys.exit(main())
