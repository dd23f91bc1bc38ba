"""Loading and validating the policy file (YAML), and compiling it for the engine.

Strategy: the YAML is composed into nodes first, so every key and value keeps its line;
the data is then validated by pydantic models that forbid unknown keys (a typo must
never silently disable a rule), and each error is reported as
``file:line: key.path: what was wrong (found ...)``. Rule sections are validated by the
Config model of the policy they name; an account's ``limits:`` and ``rules:`` are merged
over the defaults and validated again, so what runs is always a valid configuration.

Three YAML traps are closed here: duplicate keys are errors (YAML keeps the last one
silently), numbers with a leading 0 or + stay strings (YAML reads ``000`` as 0), and so
do times of day (YAML reads ``21:00`` as 1260).
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import phonenumbers
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from policies.base import SETTINGS, Account, Mode, Policy, RuleConfig
from policies.lists import POLICY_FILE
from policies.numbering import EmergencyNumbers, NumberSet, overlapping_pairs
from policies.registry import available_policies

from .flood import (
    DEFAULT_BAN_SECONDS,
    DEFAULT_BURST,
    DEFAULT_MAX_BAN_SECONDS,
    DEFAULT_MAX_SOURCES,
    DEFAULT_MESSAGES_PER_SECOND,
    DEFAULT_SCANNER_USER_AGENTS,
)
from .sip.abnf import HOSTNAME_OR_IPV4
from .sip.events import Address, parse_address
from .state.history import HistorySettings
from .state.redis_url import NODES_SCHEMES, REDIS_SCHEMES, check_single_url, parse_nodes_url

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
SECRET_KEYS = frozenset({"token"})
DEFAULT_EMERGENCY_NUMBERS = ["911", "112", "999", "000", "110", "119", "933", "988"]
YAML_TAG_PREFIX = "tag:yaml.org,2002:"  # written !! in a file
MERGE_TAG = YAML_TAG_PREFIX + "merge"  # the << key


class _Strict(BaseModel):
    model_config = SETTINGS


def _networks(value: list[str]) -> list[str]:
    """Each item an IPv4/IPv6 network or address (``192.0.2.0/24``, ``10.0.0.10``)."""
    for text in value:
        ipaddress.ip_network(text, strict=False)
    return value


class ProxySection(_Strict):
    listen: list[str] = Field(default=["udp:127.0.0.1:5060"], min_length=1)
    upstream: str = "udp:127.0.0.1:5070"
    trusted_peers: list[str] = Field(default=[], description="PBX-side hosts/networks: not policed")
    advertise: str | None = None
    max_calls: int = Field(default=100_000, ge=1)
    max_call_lifetime: float = Field(default=4 * 3600.0, gt=0, description="seconds")
    ringing_timeout: float = Field(default=180.0, gt=0, description="seconds")
    tcp_idle_timeout: float = Field(default=600.0, gt=0, description="seconds")
    server_header: str | None = "sipguard"

    @field_validator("listen")
    @classmethod
    def _listen_addresses(cls, value: list[str]) -> list[str]:
        for uri in value:
            parse_address(uri)
        return value

    @field_validator("upstream")
    @classmethod
    def _upstream_address(cls, value: str) -> str:
        parse_address(value)
        return value

    _trusted_peers = field_validator("trusted_peers")(_networks)

    @field_validator("advertise")
    @classmethod
    def _a_host(cls, value: str | None) -> str | None:
        """Written into Via and Record-Route as HOST:PORT (RFC 3261 §25.1 host, IPv6 bare)."""
        if value is not None and not (_is_ip(value) or re.fullmatch(HOSTNAME_OR_IPV4, value)):
            raise ValueError("expected an IP address or a host name (IPv6 without brackets, no port)")
        return value

    @field_validator("server_header")
    @classmethod
    def _one_header_line(cls, value: str | None) -> str | None:
        """Written into every reply: a CR or LF in it would start header lines of its own."""
        if value is not None and not value.isprintable():
            raise ValueError("a header value is printable text on one line")
        return value


def _known_region(value: str | None) -> str | None:
    if value is None:
        return None
    if value.upper() not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"unknown region {value!r} (ISO 3166 code such as US, GB, DE)")
    return value.upper()


def _numbers_as_text(value: Any) -> Any:
    """YAML reads an unquoted 4155550100 as an int; a telephone number is text."""
    if not isinstance(value, list):
        return value
    return [str(item) if isinstance(item, int) and not isinstance(item, bool) else item for item in value]


def _dialled_digits(value: str) -> str:
    """What EmergencyNumbers compares with the dialled digits: any other text never matches."""
    if not re.fullmatch(r"\+?[0-9]+", value):
        raise ValueError("an emergency number is digits, with or without a leading + (911, 112, +1911)")
    return value


EmergencyNumber = Annotated[str, AfterValidator(_dialled_digits)]


class NumberingSection(_Strict):
    default_region: str = "US"

    _region = field_validator("default_region")(_known_region)


class AccountLimits(_Strict):
    """Shorthand for the most used rule settings; see each rule for the long form."""

    concurrent_per_number: int | None = Field(default=None, ge=1)
    concurrent: int | None = Field(default=None, ge=1)
    concurrent_per_destination: int | None = Field(default=None, ge=1)
    calls_per_minute_per_number: float | dict[str, Any] | None = None
    calls_per_minute: float | dict[str, Any] | None = None
    calls_per_minute_per_source: float | dict[str, Any] | None = None
    calls_per_minute_per_destination: float | dict[str, Any] | None = None
    max_call_duration: float | None = Field(default=None, gt=0)
    calls_per_day: int | None = Field(default=None, ge=1)
    calls_per_day_per_number: int | None = Field(default=None, ge=1)
    minutes_per_day: int | None = Field(default=None, ge=1)
    minutes_per_day_per_number: int | None = Field(default=None, ge=1)


class AccountSection(_Strict):
    sources: list[str] = Field(default=[], description="source networks, e.g. 192.0.2.0/24")
    from_domains: list[str] = []
    auth_usernames: list[str] = []
    numbers: list[str] = []
    region: str | None = None
    limits: AccountLimits = AccountLimits()
    rules: dict[str, dict[str, Any]] = {}
    telemarketing: bool = Field(default=False, description="the calling_hours and do_not_call rules apply")

    _region = field_validator("region")(_known_region)
    _numbers = field_validator("numbers", mode="before")(_numbers_as_text)

    _sources = field_validator("sources")(_networks)


class StateSection(_Strict):
    """Where counters live: ``memory`` (this process) or a Redis URL shared by instances:
    one server (``redis://[:PASSWORD@]HOST:PORT/DB``, ``rediss://`` for TLS, ``unix://``),
    a master found through Sentinel
    (``redis+sentinel://[:PASSWORD@]HOST:PORT[,HOST:PORT...]/SERVICE[/DB]``, the sentinels'
    addresses and the monitored service name; the password is the master's), or a Redis
    Cluster (``redis+cluster://[:PASSWORD@]HOST:PORT[,HOST:PORT...]``, startup nodes)."""

    url: str = Field(
        default="memory",
        description="memory, redis://, rediss://, unix://, "
        "redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB] "
        "or redis+cluster://HOST:PORT[,HOST:PORT...]",
    )
    lease: float = Field(default=60.0, gt=0, description="seconds a dead instance's slots stay taken")
    # at most 2 s: sipguard gives up on a verdict after 5 s (503 Policy Decision Timeout),
    # and a longer wait would reach that first, whatever the rules' fail_mode says
    timeout: float = Field(default=0.25, gt=0, le=2.0, description="seconds to wait for Redis per INVITE")

    @model_validator(mode="before")
    @classmethod
    def _url_shorthand(cls, value: Any) -> Any:
        """``state: redis://10.0.0.5:6379/0`` is short for ``state: {url: ...}``."""
        return {"url": value} if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if value != "memory" and not value.startswith(REDIS_SCHEMES):
            raise ValueError(f"expected memory or a Redis URL ({', '.join(REDIS_SCHEMES)}...)")
        if value.startswith(NODES_SCHEMES):
            parse_nodes_url(value)  # its ValueError says what is wrong
        elif value != "memory":
            check_single_url(value)  # so does its
        return value


class FloodSection(_Strict):
    """Flood and scanner defence, applied to every message before it is parsed."""

    enabled: bool = Field(default=True, description="false: admit every message (bans still listed)")
    messages_per_second: float = Field(
        default=DEFAULT_MESSAGES_PER_SECOND,
        gt=0,
        description="sustained messages per second one source address may send (requests and "
        "responses alike); a busy office behind one NAT sends a few hundred at most",
    )
    burst: int = Field(
        default=DEFAULT_BURST,
        ge=1,
        description="messages a source may send at once, after which it must keep to the rate",
    )
    ban_seconds: float = Field(default=DEFAULT_BAN_SECONDS, gt=0, description="first ban of a source")
    max_ban_seconds: float = Field(
        default=DEFAULT_MAX_BAN_SECONDS,
        gt=0,
        description="bans double for a source banned again within this long, up to this long",
    )
    user_agents: list[str] = Field(
        default=list(DEFAULT_SCANNER_USER_AGENTS),
        description="User-Agent substrings (any case) that ban a source at its first message",
    )
    exempt: list[str] = Field(
        default=[],
        description="networks never counted or banned, besides proxy.trusted_peers and the upstream",
    )
    max_sources: int = Field(
        default=DEFAULT_MAX_SOURCES, ge=100, description="source addresses tracked (and banned) at most"
    )

    _exempt = field_validator("exempt")(_networks)

    @field_validator("user_agents")
    @classmethod
    def _signatures(cls, value: list[str]) -> list[str]:
        for agent in value:
            if len(agent.strip()) < 4 or not agent.isascii() or not agent.isprintable():
                raise ValueError(f"{agent!r}: a signature is at least 4 printable ASCII characters")
        return value

    @model_validator(mode="after")
    def _ban_lengths(self) -> FloodSection:
        if self.max_ban_seconds < self.ban_seconds:
            raise ValueError(
                f"max_ban_seconds {self.max_ban_seconds:g} is less than ban_seconds {self.ban_seconds:g}"
            )
        return self


def parse_admin_address(text: str) -> tuple[str, int]:
    """``127.0.0.1:5065``, ``[::1]:5065`` or ``localhost:5065`` as (host, port); port 0
    takes any free port."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"not HOST:PORT: {text!r} (e.g. 127.0.0.1:5065, [::1]:5065)")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address (or localhost)") from None
    return host, int(port)


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


class AdminSection(_Strict):
    """The admin HTTP listener (status, explain, bans, unban, reload) and what it remembers."""

    listen: str | None = Field(
        default="127.0.0.1:5065", description="HOST:PORT to listen on, [::1]:PORT for IPv6; null: none"
    )
    token: str | None = Field(
        default=None,
        min_length=16,
        description="clients must send Authorization: Bearer TOKEN; required beyond loopback",
    )
    recent_calls: int = Field(
        default=10_000,
        ge=0,
        le=1_000_000,
        description="decisions remembered for sipguard explain and status (1.3-3 KB each); 0: none",
    )

    @field_validator("listen")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            parse_admin_address(value)
        return value

    @field_validator("token")
    @classmethod
    def _header_safe(cls, value: str | None) -> str | None:
        if value is not None and not all("!" <= char <= "~" for char in value):
            raise ValueError("a token is printable ASCII with no spaces (it goes in an HTTP header)")
        return value

    @model_validator(mode="after")
    def _token_beyond_loopback(self) -> AdminSection:
        if self.listen is None or self.token is not None:
            return self
        if not is_loopback(parse_admin_address(self.listen)[0]):
            raise ValueError(f"listening on {self.listen} beyond loopback needs a token")
        return self


class PolicyFileModel(_Strict):
    proxy: ProxySection = ProxySection()
    state: StateSection = StateSection()
    flood: FloodSection = FloodSection()
    admin: AdminSection = AdminSection()
    numbering: NumberingSection = NumberingSection()
    emergency_numbers: list[EmergencyNumber] = Field(default=DEFAULT_EMERGENCY_NUMBERS)
    mode_override: Mode | None = Field(default=None, description="run every rule in this mode")
    accounts: dict[str, AccountSection] = {}
    rules: dict[str, dict[str, Any] | None] = {}  # "caller_id:" alone: the rule with its defaults

    _emergency_as_text = field_validator("emergency_numbers", mode="before")(_numbers_as_text)


RuleSet = tuple[tuple[Policy[Any], RuleConfig], ...]
# setting -> (the path it was written at, whether the setting's own keys are written under it)
Written = dict[str, tuple[tuple[Any, ...], bool]]


@dataclass(frozen=True, kw_only=True)
class CompiledPolicy:
    """A validated policy file, ready for the engine. Immutable: a reload swaps it whole."""

    path: str
    loaded_at: float  # wall-clock time of loading, for operators
    proxy: ProxySection
    state: StateSection
    flood: FloodSection
    admin: AdminSection
    region: str
    emergency: EmergencyNumbers
    rules: RuleSet  # in file order, as configured for callers of no account
    accounts: dict[str, Account]
    account_rules: dict[str, RuleSet]
    networks: tuple[tuple[IPNetwork, str], ...]  # most specific first
    from_domains: dict[str, str]
    auth_usernames: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    history: HistorySettings = field(default_factory=HistorySettings)  # how the call history measures

    @property
    def local_slot_lease(self) -> float:
        """Lease of a slot in an in-process store: the core ends every call by its maximum
        lifetime, so this only guards against a lost end event; 5 minutes' margin."""
        return self.proxy.max_call_lifetime + 300.0

    @property
    def upstream(self) -> Address:
        return parse_address(self.proxy.upstream)

    @property
    def listen(self) -> list[Address]:
        return [parse_address(uri) for uri in self.proxy.listen]


class PolicyFileError(Exception):
    """The file cannot be used; ``errors`` are ``file:line: path: message`` lines."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def default_policy() -> CompiledPolicy:
    """The policy when no file is given: no accounts, no rules — a plain proxy, as asked
    (a file with no rules is warned about: it may have been cut short)."""
    return replace(compile_policy({}, {}, "<defaults>"), warnings=[])


def load_policy(path: str | Path) -> CompiledPolicy:
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise PolicyFileError([f"{name}: cannot read: {error}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - raw.rfind(b"\n", 0, error.start)
        problem = f"byte 0x{raw[error.start]:02x} in column {column} (save the file as UTF-8)"
        raise PolicyFileError([f"{name}:{line}: cannot read: not UTF-8: {problem}"]) from None
    data, lines = _load_yaml(text, name)
    return compile_policy(data, lines, name)


def compile_policy(data: Any, lines: dict[tuple[Any, ...], int], name: str) -> CompiledPolicy:
    errors = _Errors(name, lines)
    if not isinstance(data, dict):
        raise PolicyFileError(
            [f"{name}:1: the file must be a mapping of sections (proxy, accounts, rules ...)"]
        )
    try:
        model = PolicyFileModel.model_validate(data)
    except ValidationError as error:
        errors.add_validation(error, (), PolicyFileModel)
        raw = data.get("rules")
        if isinstance(raw, dict) and all(isinstance(v, dict | None) for v in raw.values()):
            _compile_rules(raw, errors, None)  # report the rules' errors in the same run
        raise PolicyFileError(errors.lines) from None
    region = model.numbering.default_region
    policies = available_policies()
    rules, raw_rules, warnings = _compile_rules(model.rules, errors, model.mode_override)
    accounts: dict[str, Account] = {}
    account_rules: dict[str, RuleSet] = {}
    networks: list[tuple[IPNetwork, str]] = []
    from_domains: dict[str, str] = {}
    auth_usernames: dict[str, str] = {}
    claimed: dict[tuple[str, str], str] = {}  # (sources | auth_usernames | from_domains, value) -> account
    for account_name, section in model.accounts.items():
        path = ("accounts", account_name)
        account_region = section.region.upper() if section.region else region
        try:
            numbers = NumberSet(section.numbers, account_region)
        except ValueError as error:
            errors.add((*path, "numbers"), str(error))
            continue
        accounts[account_name] = Account(
            name=account_name, numbers=numbers, region=account_region, telemarketing=section.telemarketing
        )
        sources = [ipaddress.ip_interface(text) for text in section.sources]
        warnings += _host_bits(sources, section.sources, (*path, "sources"), errors)
        networks += [(source.network, account_name) for source in sources]
        from_domains.update({domain.lower(): account_name for domain in section.from_domains})
        auth_usernames.update({user: account_name for user in section.auth_usernames})
        for kind, claims, first_wins in (
            ("sources", [str(source.network) for source in sources], True),
            ("auth_usernames", section.auth_usernames, False),
            ("from_domains", [domain.lower() for domain in section.from_domains], False),
        ):
            for claim in claims:
                owner = claimed.setdefault((kind, claim), account_name)
                if owner != account_name:  # networks: most specific, then file order; names: last
                    winner = owner if first_wins else account_name
                    shared = f"{claim} is also account {owner!r}'s: its calls go to {winner!r} alone"
                    warnings.append(errors.where((*path, kind), shared))
        if not (section.sources or section.from_domains or section.auth_usernames):
            unreachable = "has no sources, from_domains or auth_usernames: no call can match it"
            warnings.append(errors.where(path, f"account {account_name!r} {unreachable}"))
        for rule_name in section.rules:
            if rule_name not in policies:
                unknown = f"unknown rule {rule_name!r}" + _suggest(rule_name, policies)
                errors.add((*path, "rules", rule_name), unknown)
            elif rule_name not in raw_rules:
                errors.add((*path, "rules", rule_name), f"rule {rule_name!r} is not enabled under rules:")
        limits = section.limits.model_dump(exclude_none=True)
        warnings += _unread_limits(limits, raw_rules, path, errors)
        effective: list[tuple[Policy[Any], RuleConfig]] = []
        for rule_name, (policy, base) in raw_rules.items():
            overrides = policy.account_overrides(limits, base)
            own = section.rules.get(rule_name, {})
            settings = {**base, **overrides, **own}
            # a bad limit is reported where it is written, not as the setting it maps onto
            written = {
                setting: ((*path, "limits", key), isinstance(value, dict))
                for key, value in limits.items()
                for setting in policy.account_overrides({key: value}, base)
                if setting not in own
            }
            config = _validate_rule(
                policy, settings, (*path, "rules", rule_name), errors, model.mode_override, written
            )
            if config is not None:
                effective.append((policy, config))
        account_rules[account_name] = tuple(effective)
    _warn_overlaps(accounts, errors, warnings)
    emergency = EmergencyNumbers(model.emergency_numbers)
    warnings += _emergency_warnings(model, emergency, accounts, errors)
    warnings += _proxy_warnings(model.proxy, errors)
    for where, texts in (
        (("proxy", "trusted_peers"), model.proxy.trusted_peers),
        (("flood", "exempt"), model.flood.exempt),
    ):
        warnings += _host_bits([ipaddress.ip_interface(text) for text in texts], texts, where, errors)
    if not model.rules:  # a file cut short before rules: (by an editor, a copy) reloads without them
        warnings.append(errors.where(("rules",), "no rules: every call is forwarded unjudged"))
    if errors.lines:
        raise PolicyFileError(errors.lines)
    networks.sort(key=lambda item: item[0].prefixlen, reverse=True)
    return CompiledPolicy(
        path=name,
        loaded_at=time.time(),
        proxy=model.proxy,
        state=model.state,
        flood=model.flood,
        admin=model.admin,
        region=region,
        emergency=emergency,
        rules=tuple(rules),
        accounts=accounts,
        account_rules=account_rules,
        networks=tuple(networks),
        from_domains=from_domains,
        auth_usernames=auth_usernames,
        warnings=warnings,
        history=_history_settings(tuple(rules), account_rules),
    )


def _history_settings(rules: RuleSet, account_rules: dict[str, RuleSet]) -> HistorySettings:
    """How the call history measures calls: as the first rule reading it says (one per
    file), keeping as many pacing gaps as any account's rules need (an account may ask
    for more samples than the file-wide rule: with fewer kept, its signature could never
    trip). Here, in the thread that compiles the file: it reads every account's rules."""
    for rule, config in rules:
        if rule.uses_history:
            settings = rule.history_settings(config)
            samples = settings.pacing_samples
            for own_rules in account_rules.values():
                for other, own in own_rules:
                    if other is rule:
                        samples = max(samples, rule.history_settings(own).pacing_samples)
            return replace(settings, pacing_samples=samples)
    return HistorySettings()


def _compile_rules(
    sections: dict[str, Any], errors: _Errors, mode_override: Mode | None
) -> tuple[list[tuple[Policy[Any], RuleConfig]], dict[str, tuple[Policy[Any], dict[str, Any]]], list[str]]:
    """The ``rules:`` section: each name must be a known policy, each body its Config."""
    policies = available_policies()
    rules: list[tuple[Policy[Any], RuleConfig]] = []
    raw_rules: dict[str, tuple[Policy[Any], dict[str, Any]]] = {}
    warnings: list[str] = []
    for rule_name, settings in sections.items():
        policy_class = policies.get(rule_name)
        if policy_class is None:
            errors.add(("rules", rule_name), f"unknown rule {rule_name!r}" + _suggest(rule_name, policies))
            continue
        policy = policy_class()
        config = _validate_rule(policy, settings or {}, ("rules", rule_name), errors, mode_override)
        if config is not None:
            rules.append((policy, config))
            raw_rules[rule_name] = (policy, settings or {})
            warnings += [errors.where(("rules", rule_name), text) for text in policy.warnings(config)]
    return rules, raw_rules, warnings


def _validate_rule(
    policy: Policy[Any],
    settings: dict[str, Any],
    path: tuple[Any, ...],
    errors: _Errors,
    mode_override: Mode | None,
    written: Written | None = None,
) -> RuleConfig | None:
    try:
        config = policy.Config.model_validate(settings, context={POLICY_FILE: errors.name})  # list files
    except ValidationError as error:
        errors.add_validation(error, path, policy.Config, written)
        return None
    return config.model_copy(update={"mode": mode_override}) if mode_override else config


def _unread_limits(
    limits: dict[str, Any],
    rules: dict[str, tuple[Policy[Any], dict[str, Any]]],
    path: tuple[Any, ...],
    errors: _Errors,
) -> list[str]:
    """An account's limit that no enabled rule reads does nothing: say so, and which rule would."""
    warnings = []
    for key, value in limits.items():
        if any(policy.account_overrides({key: value}, base) for policy, base in rules.values()):
            continue
        readers = [
            name
            for name, policy in available_policies().items()
            if policy().account_overrides({key: value}, {})
        ]
        hint = (
            f"enable {' or '.join(readers)} under rules: for it to apply" if readers else "no rule reads it"
        )
        warnings.append(
            errors.where((*path, "limits", key), f"limit {key} is read by no enabled rule: {hint}")
        )
    return warnings


def _proxy_warnings(section: ProxySection, errors: _Errors) -> list[str]:
    """Addresses that load but would not work on a real network."""
    listen = [parse_address(text) for text in section.listen]
    warnings = [errors.where(("proxy", "listen"), text) for text in unadvertised(listen, section.advertise)]
    upstream_host = parse_address(section.upstream).host
    if not section.trusted_peers and not _is_ip(upstream_host):
        unrecognised = (
            f"{upstream_host} is a host name: requests from the PBX are told apart by their source "
            "address, so list its addresses in proxy.trusted_peers, or its calls are judged as a customer's"
        )
        warnings.append(errors.where(("proxy", "upstream"), unrecognised))
    return warnings


def _host_bits(
    interfaces: list[IPInterface], texts: list[str], path: tuple[Any, ...], errors: _Errors
) -> list[str]:
    """``192.0.2.7/24`` is read as the network 192.0.2.0/24, which may not be what was meant."""
    return [
        errors.where(
            (*path, index),
            f"{text} has host bits set: it means {interface.network} (the host alone is {interface.ip})",
        )
        for index, (interface, text) in enumerate(zip(interfaces, texts, strict=True))
        if interface.ip != interface.network.network_address
    ]


def _emergency_warnings(
    model: PolicyFileModel, emergency: EmergencyNumbers, accounts: dict[str, Account], errors: _Errors
) -> list[str]:
    """No emergency numbers at all, and accounts that own one: calls to it bypass every rule."""
    if not model.emergency_numbers:
        nothing = (
            "empty: no dialled number is an emergency call (urn:service:sos still is), so calls to "
            "911 or 112 are judged, counted and refused like any other"
        )
        return [errors.where(("emergency_numbers",), nothing)]
    return [
        errors.where(
            ("accounts", name, "numbers"),
            f"account {name!r} owns {number}{'' if entry == number else f' (in {entry})'}, which dials "
            f"emergency number {dialled}: calls to it bypass every rule",
        )
        for name, account in accounts.items()
        for number, entry, dialled in emergency.owned_by(account.numbers)
    ]


def unadvertised(listen: list[Address], advertise: str | None) -> list[str]:
    """Listening on 0.0.0.0 or :: writes that address into Via and Record-Route unless
    ``advertise`` names a reachable one: peers could not send the ACK and BYE back."""
    if advertise:
        return []
    return [
        f"{address} is a wildcard address: set proxy.advertise to the address peers reach this instance "
        "at (it goes into Via and Record-Route, where in-dialog requests are sent)"
        for address in listen
        if _is_wildcard(address.host)
    ]


def _is_wildcard(host: str) -> bool:
    return _is_ip(host) and ipaddress.ip_address(host).is_unspecified


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:  # a host name
        return False
    return True


def _warn_overlaps(accounts: dict[str, Account], errors: _Errors, warnings: list[str]) -> None:
    for first, second in overlapping_pairs({name: account.numbers for name, account in accounts.items()}):
        shared = accounts[first].numbers.overlaps(accounts[second].numbers)
        if shared:
            listed = ", ".join(shared[:3]) + (" ..." if len(shared) > 3 else "")
            warnings.append(
                errors.where(
                    ("accounts", second, "numbers"),
                    f"accounts {first!r} and {second!r} both own {listed}",
                )
            )


class _Errors:
    def __init__(self, name: str, lines: dict[tuple[Any, ...], int]) -> None:
        self.name = name
        self._lines = lines
        self.lines: list[str] = []

    def where(self, path: tuple[Any, ...], message: str) -> str:
        return _located(self.name, self._line(path), path, message)

    def add(self, path: tuple[Any, ...], message: str) -> None:
        self.lines.append(self.where(path, message))

    def add_validation(
        self,
        error: ValidationError,
        prefix: tuple[Any, ...],
        model: type[BaseModel],
        written: Written | None = None,
    ) -> None:
        """Each problem as ``file:line: path: message``; ``written`` maps settings that came
        from elsewhere (an account's limits) to the path they were written at."""
        for problem in error.errors():
            location = tuple(part for part in problem["loc"] if not _is_union_tag(part))
            path = prefix + location
            if written and location and location[0] in written:
                where, nested = written[location[0]]
                path = where + location[1:] if nested else where
            if problem["type"] == "extra_forbidden":
                known = _known_keys(model, location[:-1])
                hint = _suggest(str(location[-1]), known) if known else ""
                message = f"unknown key {location[-1]!r}{hint}"
            elif location and location[-1] in SECRET_KEYS:
                message = f"{problem['msg']}"  # never echo a secret into a log
            else:
                message = f"{problem['msg']}; found {_shown(problem.get('input'))}"
            self.add(path, message)

    def _line(self, path: tuple[Any, ...]) -> int:
        for end in range(len(path), -1, -1):
            line = self._lines.get(path[:end])
            if line is not None:
                return line
        return 1


def _located(name: str, line: int, path: tuple[Any, ...], message: str) -> str:
    """``file:line: key.path: message``, the form of every error and warning."""
    dotted = ".".join(str(part) for part in path)
    return f"{name}:{line}: {dotted}: {message}" if dotted else f"{name}:{line}: {message}"


def _is_union_tag(part: Any) -> bool:
    """pydantic puts union branch names (``float``, ``dict[str,any]``...) into error paths."""
    return isinstance(part, str) and (
        part in ("float", "int", "str", "bool") or "[" in part or part.endswith("]")
    )


def _known_keys(model: type[BaseModel], location: tuple[Any, ...]) -> list[str]:
    """The keys allowed at ``location`` under ``model``, for a did-you-mean hint."""
    current: Any = model
    for part in location:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        info = current.model_fields.get(str(part))
        if info is None:  # a dict key (account or rule name): step into the value type
            continue
        current = _model_in(info.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()):
        found = _model_in(argument)
        if found is not None:
            return found
    return None


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (expected one of: {', '.join(sorted(choices))})"


# the password in a URL (redis://:PASSWORD@host, redis://user:PASSWORD@host): errors go to
# logs and terminals, where a shared store's password must not
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@/\s]+@")


def _shown(value: Any) -> str:
    text = _URL_PASSWORD.sub(r"\1***@", repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


# -- YAML with lines -------------------------------------------------------------------------
LIBYAML = yaml.__with_libyaml__  # PyYAML built with libyaml (tests turn it off to compare)
# YAML 1.1 §5.1 printable characters, as both PyYAML's reader and libyaml's check them
_NOT_YAML_TEXT = re.compile("[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

if yaml.__with_libyaml__:
    from yaml._yaml import CParser

    class _LibyamlLoader(Composer, CParser, SafeConstructor, Resolver):
        """libyaml scans and parses, PyYAML's own composer builds the nodes: the same nodes
        and marks as ``yaml.SafeLoader``, 3 to 5 times faster (scanning and parsing are most
        of the time). Not ``yaml.CSafeLoader``: its composer recurses in C, unbounded by
        Python's recursion limit, and a file nested 50,000 deep crashed the process
        (SIGSEGV) where this one is a "nested too deeply" error."""

        def __init__(self, text: str) -> None:
            CParser.__init__(self, text)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            Composer.__init__(self)


def _yaml_loader(text: str) -> yaml.SafeLoader | _LibyamlLoader:
    return _LibyamlLoader(text) if LIBYAML else yaml.SafeLoader(text)


def _load_yaml(text: str, name: str) -> tuple[Any, dict[tuple[Any, ...], int]]:
    control = _NOT_YAML_TEXT.search(text)
    if control is not None:  # both parsers refuse it, without a line (PyYAML's with a traceback)
        at = control.start()
        line, column = text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)
        problem = (
            f"character U+{ord(control.group()):04X} in column {column}: control characters are not allowed"
        )
        raise PolicyFileError([f"{name}:{line}: not valid YAML: {problem}"])
    loader = _yaml_loader(text)
    try:
        root = loader.get_single_node()
    except RecursionError:  # [[[[...: PyYAML composes a node inside its parent's call
        event = loader.peek_event()  # the node that was one too deep
        mark = event.start_mark if event is not None else None
        line = mark.line + 1 if mark is not None else 1
        raise PolicyFileError([f"{name}:{line}: not valid YAML: nested too deeply"]) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(error, "problem", None) or str(error)
        raise PolicyFileError([f"{name}:{line}: not valid YAML: {problem}"]) from None
    finally:
        loader.dispose()
    if root is None:
        return {}, {}
    lines: dict[tuple[Any, ...], int] = {}
    duplicates: list[str] = []
    data = _build(root, (), lines, duplicates, loader, name)
    if duplicates:
        raise PolicyFileError(duplicates)
    return data, lines


def _build(
    node: yaml.Node,
    path: tuple[Any, ...],
    lines: dict[tuple[Any, ...], int],
    duplicates: list[str],
    loader: SafeConstructor,
    name: str,
    ancestors: frozenset[yaml.Node] = frozenset(),
) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if node in ancestors:  # &a [*a]: a value that contains itself is infinitely deep
        itself = "an alias refers to the mapping or list it is part of"
        raise PolicyFileError([_located(name, lines[path], path, itself)])
    ancestors |= {node}
    if isinstance(node, yaml.MappingNode):
        mapping: dict[Any, Any] = {}
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                merges.append(value_node)
                continue
            key = _build(key_node, (*path, "<key>"), {}, duplicates, loader, name)
            if not isinstance(key_node, yaml.ScalarNode):  # ? [a, b]: a list is no dict key
                found = f"a key must be a single value (a name or a number); found {_shown(key)}"
                raise PolicyFileError([_located(name, key_node.start_mark.line + 1, path, found)])
            if key in mapping:
                dotted = ".".join(map(str, (*path, key)))
                line = key_node.start_mark.line + 1
                duplicates.append(f"{name}:{line}: {dotted}: duplicate key (YAML keeps only the last one)")
            lines[(*path, key)] = key_node.start_mark.line + 1
            mapping[key] = _build(value_node, (*path, key), lines, duplicates, loader, name, ancestors)
        if not merges:
            return mapping
        merged = _merged(merges, path, lines, set(mapping), duplicates, loader, name, ancestors)
        return {**merged, **mapping}  # keys written here win over merged ones, as in YAML
    if isinstance(node, yaml.SequenceNode):
        return [
            _build(item, (*path, index), lines, duplicates, loader, name, ancestors)
            for index, item in enumerate(node.value)
        ]
    assert isinstance(node, yaml.ScalarNode)
    if node.tag == "tag:yaml.org,2002:int" and node.value[:1] in ("0", "+") and len(node.value) > 1:
        return node.value  # telephone numbers: 000 and +1415... are not arithmetic
    if node.tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") and ":" in node.value:
        return node.value  # times of day: YAML 1.1 reads 21:00 as 1260 (base 60)
    try:
        return loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, KeyError) as error:  # !foo x, !!int abc, a date 2001-02-30
        tag = node.tag.replace(YAML_TAG_PREFIX, "!!")
        problem = (
            f"unknown tag {tag!r}"
            if isinstance(error, yaml.constructor.ConstructorError)
            else f"cannot read {node.value!r} as {tag} (quote it to make it text)"
        )
        line = node.start_mark.line + 1
        raise PolicyFileError([_located(name, line, path, f"not valid YAML: {problem}")]) from None


def _merged(
    merges: list[yaml.Node],
    path: tuple[Any, ...],
    lines: dict[tuple[Any, ...], int],
    written: set[Any],
    duplicates: list[str],
    loader: SafeConstructor,
    name: str,
    ancestors: frozenset[yaml.Node],
) -> dict[Any, Any]:
    """The keys ``<<:`` merge keys bring (YAML 1.1 merge): each one mapping, or a list of
    them where the first listed wins. The lines of the keys not ``written`` in the mapping
    itself are where the merged values are."""
    sources = [
        source
        for node in merges
        for source in (node.value if isinstance(node, yaml.SequenceNode) else [node])
    ]
    for source in sources:
        if not isinstance(source, yaml.MappingNode):
            found = _shown(_build(source, (), {}, duplicates, loader, name))
            expected = f"merges mappings (<<: *anchor or <<: [*a, *b]); found {found}"
            raise PolicyFileError([_located(name, source.start_mark.line + 1, (*path, "<<"), expected)])
    merged: dict[Any, Any] = {}
    for source in reversed(sources):
        source_lines: dict[tuple[Any, ...], int] = {}
        merged.update(_build(source, path, source_lines, duplicates, loader, name, ancestors))
        for where, line in source_lines.items():
            if len(where) > len(path) and where[len(path)] not in written:
                lines[where] = line
    return merged
