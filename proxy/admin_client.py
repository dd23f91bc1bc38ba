"""The ``sipguard`` commands that ask a running sipguard through its admin listener:
status, explain, bans, unban, reload (the endpoints are in proxy/admin.py; docs/admin.md).

Each prints something readable in a terminal, or the listener's JSON as it is with
``--json``, and exits 0 when done, 1 when the answer is "no" (a call not remembered, a
source not banned, a number not boxed, a policy file refused) and 2 when the listener
could not be asked or refused the request (unreachable, wrong token, bad input).
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from .policyfile import parse_admin_address
from .sip.hosts import is_ip
from .terminal import duration, table

TOKEN_VARIABLE = "SIPGUARD_ADMIN_TOKEN"
ADMIN_TIMEOUT = 10.0
# A reload answers once the file is compiled: ~13 s for 20,000 accounts, and a reload
# asked while another compiles waits for it
RELOAD_TIMEOUT = 300.0
DONE, NO, FAILED = 0, 1, 2


class AdminUnreachableError(Exception):
    pass


def admin_call(
    admin: str, token: str | None, method: str, path: str, body: Any = None, *, timeout: float = ADMIN_TIMEOUT
) -> tuple[int, Any]:
    """One request to the admin listener: (HTTP status, JSON body)."""
    host, port = parse_admin_address(admin)
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{netloc}{path}", data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    token = token or os.environ.get(TOKEN_VARIABLE)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.load(error)
        except ValueError:
            return error.code, {"error": error.reason}
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as error:
        # (HTTPException: what answered is not an HTTP server, or it cut its answer short)
        reason = getattr(error, "reason", None) or f"{type(error).__name__}: {' '.join(str(error).split())}"
        raise AdminUnreachableError(f"cannot ask the admin listener at {admin}: {reason}") from None


def _ask(
    admin: str, token: str | None, method: str, path: str, body: Any = None, *, timeout: float = ADMIN_TIMEOUT
) -> tuple[int, Any] | None:
    """``admin_call``, or None after saying on stderr why the listener could not be asked."""
    try:
        return admin_call(admin, token, method, path, body, timeout=timeout)
    except (AdminUnreachableError, ValueError) as error:
        print(f"sipguard: {error}", file=sys.stderr)
        return None


def _failed(status: int, answer: Any) -> int:
    message = answer.get("error") if isinstance(answer, dict) else answer
    print(f"sipguard: the admin listener answered {status}: {message}", file=sys.stderr)
    return FAILED


def _print_json(answer: Any) -> None:
    print(json.dumps(answer, indent=2))


def _show(
    admin: str,
    token: str | None,
    path: str,
    as_text: Callable[[Any], list[str]],
    *,
    as_json: bool,
    unknown: bool = False,
) -> int:
    """``GET path``, printed as JSON or as ``as_text`` lays it out. ``unknown``: a 404
    means "not found" (its message on stdout, exit 1), not a failure."""
    asked = _ask(admin, token, "GET", path)
    if asked is None:
        return FAILED
    status, answer = asked
    if status == 404 and unknown:
        print(answer.get("error") if isinstance(answer, dict) else answer)
        return NO
    if status != 200:
        return _failed(status, answer)
    if as_json:
        _print_json(answer)
        return DONE
    try:
        lines = as_text(answer)
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        return _not_sipguard(admin, path, error)
    print("\n".join(lines))
    return DONE


def _not_sipguard(admin: str, path: str, error: Exception) -> int:
    """An answer in JSON but not of the shape sipguard's listener gives (``--admin``
    pointed at another HTTP service, or a sipguard of another version): one line, exit 2."""
    what = f"{type(error).__name__}: {error}"
    print(
        f"sipguard: the answer of {admin} to {path} is not sipguard's ({what}); use --json to see it",
        file=sys.stderr,
    )
    return FAILED


# -- bans, unban --------------------------------------------------------------------------------
def bans_command(admin: str, token: str | None, *, as_json: bool = False) -> int:
    """``sipguard bans``: a table of the banned sources, or their JSON with --json."""
    return _show(admin, token, "/bans", _bans_lines, as_json=as_json)


def _bans_lines(bans: list[dict[str, Any]]) -> list[str]:
    if not bans:
        return ["no source is banned"]
    return [*_bans_table(bans), f"{len(bans)} source{'s' if len(bans) != 1 else ''} banned"]


def _bans_table(bans: list[dict[str, Any]]) -> list[str]:
    rows = [("ADDRESS", "REASON", "LEFT", "DROPPED", "OFFENCES", "UNTIL", "DETAIL")]
    rows += [
        (
            ban["address"], ban["reason"], duration(ban["seconds_left"]), str(ban["dropped"]),
            str(ban["offences"]), ban["until"], ban["detail"],
        )
        for ban in bans
    ]  # fmt: skip
    return table(rows, right_aligned={3, 4})


def unban_command(
    target: str | None, account: str | None, admin: str, token: str | None, *, as_json: bool = False
) -> int:
    """``sipguard unban ADDRESS|NUMBER [--account NAME]``: an IP address's flood ban is
    lifted; a number (and/or an account) leaves the penalty box. 0 done, 1 it was not
    banned or boxed, 2 the listener could not be asked or the input is not usable."""
    if target is None and account is None:
        print("sipguard: unban what? give an ADDRESS, a NUMBER or --account NAME", file=sys.stderr)
        return FAILED
    if target is not None and is_ip(target):
        if account is not None:
            print("sipguard: --account goes with a number, not with an address", file=sys.stderr)
            return FAILED
        body: dict[str, str] = {"address": target}
    else:
        body = {"number": target} if target is not None else {}
        if account is not None:
            body["account"] = account
    asked = _ask(admin, token, "POST", "/unban", body)
    if asked is None:
        return FAILED
    status, answer = asked
    if as_json:
        _print_json(answer)
    if status not in (200, 404):
        return _failed(status, answer)
    if as_json:
        return DONE if status == 200 else NO
    try:
        if status == 200:
            lines = _unban_lines(answer)
        else:
            lines = [f"{target} was not banned" if "address" in body else answer["error"]]
    except (KeyError, TypeError, AttributeError) as error:
        return _not_sipguard(admin, "/unban", error)
    if lines:
        print("\n".join(lines))
    return DONE if status == 200 else NO


def _unban_lines(answer: dict[str, Any]) -> list[str]:
    """POST /unban's answer as text: the ban lifted, or the penalty-box entries released."""
    if "unbanned" in answer:
        ban = answer["unbanned"]
        return [f"{ban['address']} unbanned ({ban['reason']}: {ban['detail']}; "
                f"{ban['dropped']} messages dropped while banned)"]  # fmt: skip
    lines = []
    for boxed in answer["released"]:
        left = duration(boxed["seconds_left"])
        lines.append(f"{boxed['kind']} {boxed['name']} released from the penalty box "
                     f"({boxed['rule']}: {boxed['reason']}; {left} were left)")  # fmt: skip
    lines += [f"{name} was not in the penalty box" for name in answer["not_boxed"]]
    return lines


# -- reload ---------------------------------------------------------------------------------------
def reload_command(admin: str, token: str | None, *, as_json: bool = False) -> int:
    """``sipguard reload``: 0 applied, 1 refused (the errors, file:line, on stderr; the
    running policy stays), 2 the listener could not be asked."""
    asked = _ask(admin, token, "POST", "/reload", timeout=RELOAD_TIMEOUT)
    if asked is None:
        return FAILED
    status, answer = asked
    if status not in (200, 422):
        return _failed(status, answer)
    if as_json:
        _print_json(answer)
        return DONE if status == 200 else NO
    try:
        out, err = _reload_lines(status, answer)
    except (KeyError, TypeError, AttributeError) as error:
        return _not_sipguard(admin, "/reload", error)
    for line in out:
        print(line)
    for line in err:
        print(line, file=sys.stderr)
    return DONE if status == 200 else NO


def _reload_lines(status: int, answer: dict[str, Any]) -> tuple[list[str], list[str]]:
    """POST /reload's answer as text: (lines for stdout, lines for stderr)."""
    if status != 200:
        refused = f"sipguard: {answer['path']} refused; {answer['running']} stays in force:"
        return [], [refused, *(f"  {error}" for error in answer["errors"])]
    out = [f"{answer['path']}: reloaded; new calls are judged by it, calls up keep their slots"]
    if answer["restart_needed"]:
        out.append("note: proxy:, state: or admin: changed: those apply after a restart")
    warnings = answer.get("warnings") or []  # (a sipguard older than its client sends none)
    if warnings:
        out += [f"warnings ({len(warnings)}):", *(f"  {warning}" for warning in warnings)]
    return out, []


# -- status ---------------------------------------------------------------------------------------
def status_command(admin: str, token: str | None, *, as_json: bool = False) -> int:
    """``sipguard status``: 0 shown, 2 the listener could not be asked."""
    return _show(admin, token, "/status", status_lines, as_json=as_json)


def status_lines(answer: dict[str, Any]) -> list[str]:
    """``GET /status``'s answer as text: the proxy and its policy, then one block per table."""
    policy = answer["policy"]
    reloads = policy["reloads"] or {"succeeded": 0, "failed": 0}
    rules = ", ".join(f"{rule['rule']} {rule['mode']}" for rule in policy["rules"]) or "none (a plain proxy)"
    loaded = f"{policy['loaded_at']} ({duration(policy['loaded_seconds_ago'])} ago)"
    lines = [
        f"sipguard up {duration(answer['uptime_seconds'])} (since {answer['started_at']})",
        f"policy {policy['path']}, loaded {loaded}; {policy['accounts']} accounts; "
        f"reloads {reloads['succeeded']} applied, {reloads['failed']} refused",
        f"rules: {rules}",
    ]
    lines += [
        f"  {name}: " + ", ".join(f"{rule} {mode}" for rule, mode in modes.items())
        for name, modes in policy["account_modes"].items()
    ]
    live = answer["live_calls"]
    lines += ["", f"live calls: {live['total']}"]
    if live["by_account"]:
        rows: Rows = [("ACCOUNT", "LIVE")]
        rows += [(entry["account"] or "(none)", str(entry["calls"])) for entry in live["by_account"]]
        lines += table(rows, right_aligned={1})
    if live["top_numbers"]:
        rows = [("NUMBER", "LIVE")]
        rows += [(entry["number"], str(entry["calls"])) for entry in live["top_numbers"]]
        lines += ["", *table(rows, right_aligned={1})]
    lines += ["", *_top_callers(answer["top_callers"]), "", *_penalty_box(answer["penalty_box"])]
    bans = answer["bans"]
    lines += ["", f"flood bans: {len(bans) or 'none'}", *(_bans_table(bans) if bans else [])]
    decisions = answer["decisions"]
    totals = decisions["since_start"]
    counts = ", ".join(f"{totals.get(key, 0)} {label}" for key, label in _VERDICTS)
    lines += [
        "",
        f"decisions since start: {sum(totals.values())} ({counts}); "
        f"{decisions['remembered']} remembered for explain (capacity {decisions['capacity']})",
    ]
    return lines


Rows = list[tuple[str, ...]]
_VERDICTS = (("accept", "forwarded"), ("reject", "refused"), ("emergency", "emergency"))


def _top_callers(top: dict[str, Any]) -> list[str]:
    callers = top["callers"]
    title = f"top callers, last {top['window_seconds']:g} s:"
    if not callers:
        return [f"{title} none"]
    rows: Rows = [("CALLER", "ACCOUNT", "CALLS", "PER MIN", "REFUSED")]
    rows += [
        (c["number"], c["account"] or "(none)", str(c["calls"]), f"{c['per_minute']:.1f}", str(c["refused"]))
        for c in callers
    ]
    return [title, *table(rows, right_aligned={2, 3, 4})]


def _penalty_box(boxed: list[dict[str, Any]]) -> list[str]:
    if not boxed:
        return ["penalty box: empty"]
    rows: Rows = [("KIND", "NAME", "RULE", "LEFT", "UNTIL", "REASON")]
    rows += [
        (b["kind"], b["name"], b["rule"], duration(b["seconds_left"]), b["until"], b["reason"]) for b in boxed
    ]
    return [f"penalty box: {len(boxed)}", *table(rows, right_aligned=set())]


# -- explain ----------------------------------------------------------------------------------------
def explain_command(call_id: str, admin: str, token: str | None, *, as_json: bool = False) -> int:
    """``sipguard explain CALL-ID``: 0 explained, 1 the call is not remembered."""
    path = "/explain?call_id=" + urllib.parse.quote(call_id, safe="")
    return _show(admin, token, path, explain_lines, as_json=as_json, unknown=True)


def explain_lines(answer: dict[str, Any]) -> list[str]:
    """``GET /explain``'s answer as text: each attempt's verdict, counters and outcome."""
    attempts = answer["attempts"]
    lines = [f"Call-ID {answer['call_id']}: {len(attempts)} INVITE{'s' if len(attempts) != 1 else ''} judged"]
    for number, attempt in enumerate(attempts, 1):
        lines += ["", f"#{number} at {attempt['at']}"]
        lines += _labelled(
            [
                ("account", f"{attempt['account'] or '(none)'}, source {attempt['source']}"),
                ("caller", _caller(attempt)),
                ("callee", attempt["callee"]),
                ("verdict", _verdict(attempt)),
            ]
        )
        if attempt["counters"]:
            rows = [("RULE", "COUNTER", "COUNT", "LIMIT", "")]
            rows += [
                (
                    c["rule"],
                    c["what"],
                    str(c["count"]),
                    str(c["limit"]),
                    "over" if c["count"] > c["limit"] else "",
                )
                for c in attempt["counters"]
            ]
            lines += _labelled([("counters", "\n".join(table(rows, right_aligned={2, 3})))])
        also = [f"{a['rule']} ({a['mode']}): {a['detail']}" for a in attempt.get("also", [])]
        warnings = [f"{w['rule']}: {w['detail']}" for w in attempt.get("warnings", [])]
        lines += _labelled([("also", "\n".join(also)), ("warnings", "\n".join(warnings))])
        if attempt["outcome"] is not None:
            lines += _labelled([("call", _outcome(attempt["outcome"]))])
    return lines


def _caller(attempt: dict[str, Any]) -> str:
    presented, e164 = attempt["caller"] or "(none)", attempt["caller_e164"]
    return f"{presented} (E.164 {e164})" if e164 else f"{presented} (no E.164 number)"


def _verdict(attempt: dict[str, Any]) -> str:
    verdict = attempt["verdict"]
    if verdict == "reject":
        return f"refused {attempt['code']} by {attempt['rule']}: {attempt['detail']}"
    if verdict == "emergency":
        return "emergency call: forwarded to the PBX unjudged and uncounted"
    return "forwarded to the PBX" + (f" ({attempt['detail']})" if attempt["detail"] else "")


def _outcome(outcome: dict[str, Any]) -> str:
    state, seconds, talk = outcome["state"], outcome["seconds"], outcome["talk_seconds"]
    if state == "ringing":
        return f"ringing for {seconds:.1f} s"
    answered = f"answered {outcome['answered_at']}" if outcome["answered_at"] else "never answered"
    if state == "answered":
        return f"{answered}; up {talk:.1f} s so far"
    reason = outcome["reason"]
    if reason == "bye" and outcome["by_caller"] is not None:
        reason += f" from the {'caller' if outcome['by_caller'] else 'callee'}"
    elif reason == "rejected" and outcome["status"] is not None:
        reason += f" {outcome['status']} by the PBX"
    talked = f", talked {talk:.1f} s" if talk is not None else ""
    return f"{answered}; ended {outcome['ended_at']} ({reason}){talked}; {seconds:.1f} s from the INVITE"


def _labelled(pairs: list[tuple[str, str]]) -> list[str]:
    """``  label     text``, continuation lines indented under the text; empty texts left out."""
    lines = []
    for label, text in pairs:
        for index, line in enumerate(text.splitlines()):
            lines.append(f"  {label if index == 0 else '':<9} {line}".rstrip())
    return lines
