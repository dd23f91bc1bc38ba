"""The hand-written references in docs/ against the code they describe, so they cannot
silently fall behind it.

- docs/policy-reference.md: every key of every policy-file model (the sections of
  proxy/policyfile.py, each built-in rule's Config from policies/registry.py, and the
  models nested in them) is named, in backticks, under its own section; each rule's
  section also shows its default reply code and reason.
- docs/logs.md: every event the code logs (found by reading the source of proxy/ and
  policies/ with ``ast``, so a call split over lines, commented, or choosing its event
  with ``a if x else b`` is still found) has a section giving each level it is logged at
  and each field passed by name; and every event documented there is still logged.

The Markdown is read as the docs are written: ``#`` headings outside code fences, keys as
inline code (`` `per_number` ``, or the last part of a dotted one, `` `reply.code` ``).
"""

from __future__ import annotations

import ast
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from policies.base import Reply, RuleConfig
from policies.registry import BUILTIN
from proxy.policyfile import PolicyFileModel

REPO = Path(__file__).resolve().parent.parent
POLICY_REFERENCE = REPO / "docs" / "policy-reference.md"
LOG_REFERENCE = REPO / "docs" / "logs.md"
SOURCES = ("proxy", "policies")
# structlog's method -> the level it writes ("exception" is an error with a traceback)
LOG_LEVELS = {
    "debug": "debug",
    "info": "info",
    "warning": "warning",
    "error": "error",
    "exception": "error",
    "critical": "critical",
}
LOGGER = "log"  # the module-level structlog logger's name in every module


# -- Markdown ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Section:
    level: int
    title: str
    body: str  # everything up to the next heading of the same or a higher level


def sections(path: Path) -> list[Section]:
    headings: list[tuple[int, str, int]] = []  # (level, title, line index)
    lines = path.read_text(encoding="utf-8").splitlines()
    fenced = False
    for index, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"(#+)\s+(.*)", line)):
            headings.append((len(heading[1]), heading[2], index))
    found = []
    for position, (level, title, start) in enumerate(headings):
        end = next((line for lvl, _, line in headings[position + 1 :] if lvl <= level), len(lines))
        found.append(Section(level, title, "\n".join(lines[start:end])))
    return found


def section_for(all_sections: list[Section], level: int, key: str, path: Path) -> Section:
    """The one heading of ``level`` that names ``key`` in backticks (`` `key` `` or `` `key:` ``)."""
    named = [s for s in all_sections if s.level == level and re.search(rf"`{re.escape(key)}:?`", s.title)]
    assert len(named) == 1, f"{path.name}: one level-{level} heading should name `{key}`: found {len(named)}"
    return named[0]


def names_in(section: Section, names: set[str]) -> set[str]:
    """Those of ``names`` that ``section`` shows as inline code (possibly dotted: `reply.code`)."""
    return {name for name in names if re.search(rf"`(?:[\w.]+\.)?{re.escape(name)}:?`", section.body)}


# -- the policy file's models --------------------------------------------------------------------
def models_in(annotation: object) -> Iterator[type[BaseModel]]:
    """The pydantic models an annotation holds (through Optional, lists, dicts, unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for argument in typing.get_args(annotation):
        yield from models_in(argument)


def keys_of(model: type[BaseModel], skip: frozenset[type[BaseModel]] = frozenset()) -> set[str]:
    """Every key a model accepts, and those of the models nested in it (but not ``skip``)."""
    keys = set(model.model_fields)
    for info in model.model_fields.values():
        for nested in models_in(info.annotation):
            if nested not in skip and nested is not model:
                keys |= keys_of(nested, skip | {model})
    return keys


def test_every_policy_file_section_and_key_is_in_the_reference() -> None:
    reference = sections(POLICY_REFERENCE)
    missing: dict[str, set[str]] = {}
    for name, info in PolicyFileModel.model_fields.items():
        section = section_for(reference, 2, name, POLICY_REFERENCE)
        keys = {name}
        for model in models_in(info.annotation):
            keys |= keys_of(model)
        if absent := keys - names_in(section, keys):
            missing[name] = absent
    assert not missing, f"keys not documented in docs/policy-reference.md, by section: {missing}"


def test_every_rule_setting_and_default_reply_is_in_the_reference() -> None:
    reference = sections(POLICY_REFERENCE)
    rules = section_for(reference, 2, "rules", POLICY_REFERENCE)
    common = keys_of(RuleConfig) | set(Reply.model_fields)  # mode, reply, fail_mode; code, reason
    assert names_in(rules, common) == common, "settings every rule has, missing from `rules:`"
    missing: dict[str, set[str]] = {}
    for name, policy in BUILTIN.items():
        section = section_for(reference, 3, name, POLICY_REFERENCE)
        assert section.body in rules.body, f"### `{name}` is not under ## `rules:`"
        own = keys_of(policy.Config, skip=frozenset({Reply})) - set(RuleConfig.model_fields)
        if absent := own - names_in(section, own):
            missing[name] = absent
        reply = policy.Config().reply
        assert str(reply.code) in section.body and reply.reason in section.body, (
            f"`{name}`: its default reply {reply.code} {reply.reason!r} is not in its section"
        )
    assert not missing, f"rule settings not documented in docs/policy-reference.md, by rule: {missing}"


def test_the_key_walk_sees_nested_models() -> None:
    """Guards the test itself: the nested keys it must find (a rate limit's burst, a
    dialer signature's min_calls, a weekday, a limits shorthand) are found."""
    assert {"per_minute", "burst"} <= keys_of(BUILTIN["call_rate"].Config)
    assert {"min_calls", "max_gap", "scopes"} <= keys_of(BUILTIN["dialer"].Config)
    assert {"mon", "sun"} <= keys_of(BUILTIN["calling_hours"].Config)
    (account,) = models_in(PolicyFileModel.model_fields["accounts"].annotation)
    assert "concurrent_per_number" in keys_of(account)


# -- log events ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LogCall:
    event: str
    level: str
    fields: frozenset[str]  # keyword arguments given by name (not those of **mapping)
    where: str


def source_nodes() -> Iterator[tuple[str, ast.AST]]:
    """Every syntax node of the code under ``SOURCES``, with its ``file:line``."""
    for root in SOURCES:
        for path in sorted((REPO / root).rglob("*.py")):
            name = path.relative_to(REPO)
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
                yield f"{name}:{getattr(node, 'lineno', 0)}", node


def log_calls() -> list[LogCall]:
    found: list[LogCall] = []
    for where, node in source_nodes():
        if _is_log_call(node):
            assert isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            fields = frozenset(keyword.arg for keyword in node.keywords if keyword.arg)
            level = LOG_LEVELS[node.func.attr]
            found += [LogCall(event, level, fields, where) for event in _event_names(node, where)]
    return found


def _is_log_call(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in LOG_LEVELS
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == LOGGER
    )


def _event_names(call: ast.Call, where: str) -> list[str]:
    """The event a log call names: a string, or either string of ``a if x else b``."""
    assert call.args, f"{where}: a log call without an event name"
    first = call.args[0]
    options = [first.body, first.orelse] if isinstance(first, ast.IfExp) else [first]
    names = [option.value for option in options if isinstance(option, ast.Constant)]
    assert len(names) == len(options) and all(isinstance(name, str) for name in names), (
        f"{where}: the event name is not a string literal, so docs/logs.md cannot be checked against it"
    )
    return [str(name) for name in names]


def test_every_module_names_its_logger_log() -> None:
    """The scan above finds ``log.info(...)``: a logger under another name would hide events."""
    for where, node in source_nodes():
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and ast.unparse(node.value.func) == "structlog.get_logger"
        ):
            targets = [ast.unparse(target) for target in node.targets]
            assert targets == [LOGGER], f"{where}: the logger is named {targets}, not {LOGGER}"


def test_the_log_scan_finds_events_however_the_call_is_written() -> None:
    events = {call.event for call in log_calls()}
    # one line each; across lines after a comment; each branch of a conditional name
    assert {"call.decision", "call.ended", "message.refused", "message.dropped", "flood.banned"} <= events


def test_every_logged_event_is_in_the_log_reference() -> None:
    reference = sections(LOG_REFERENCE)
    problems: list[str] = []
    for call in log_calls():
        documented = [s for s in reference if s.level == 3 and f"`{call.event}`" in s.title]
        if len(documented) != 1:
            problems.append(f"{call.where}: `{call.event}` has {len(documented)} sections in docs/logs.md")
            continue
        body = documented[0].body
        if f"`{call.level}`" not in body:
            problems.append(f"{call.where}: `{call.event}` level `{call.level}` is not in its section")
        if absent := {field for field in call.fields if f"`{field}`" not in body}:
            problems.append(f"{call.where}: `{call.event}` fields not in its section: {sorted(absent)}")
    assert not problems, "\n".join(problems)


def test_every_documented_event_is_still_logged() -> None:
    events = {call.event for call in log_calls()}
    documented = {
        match[1]
        for section in sections(LOG_REFERENCE)
        if section.level == 3 and (match := re.fullmatch(r"`([a-z_]+\.[a-z_]+)`.*", section.title))
    }
    assert documented, "docs/logs.md documents no event (### `event.name` headings)"
    assert not documented - events, f"documented in docs/logs.md but logged nowhere: {documented - events}"
