"""destinations — AUP: traffic pumping and toll fraud. Which numbers may be called, by
prefix: blocked ranges (premium rate, international networks such as +882/+883, the
small-country ranges pumping schemes terminate on) and allowed ranges inside them.

The longest listed prefix of the dialled number decides, so lists nest: block ``+44``,
allow ``+4420`` (London), block ``+44207946`` again. A number no prefix matches is
allowed, or, with ``unlisted: block``, refused: then only the allowed prefixes may be
called (an account restricted to domestic calls: ``allow: ["+1"]``, ``unlisted: block``).

The dialled number is the call's E.164 callee; when phonenumbers does not call it valid
(an unallocated or newly allocated range: what a pumping scheme may well dial), its
digits are still read as E.164 where they can be (``+...``, or national and
international forms in the account's region), so no block list is bypassed by dialling
a number the metadata doesn't know. A callee with no digits at all (``sip:alice@...``)
is not a telephone number: allowed, or refused with ``non_number: block``.
"""

from __future__ import annotations

from functools import cached_property

from pydantic import Field, model_validator

from .base import ALLOW, CallContext, Deny, Policy, Reply, RuleConfig, Verdict
from .lists import Action, E164Text, ListedPrefixes, PrefixFileField, PrefixTable


class DestinationsConfig(RuleConfig):
    reply: Reply = Reply(code=403, reason="Destination not permitted")
    block: list[E164Text] = Field(
        default=[], description='prefixes that may not be called, e.g. "+882", "+44 9" (default none)'
    )
    allow: list[E164Text] = Field(
        default=[], description="prefixes that may be called inside a blocked one, e.g. +4420 (default none)"
    )
    block_files: list[PrefixFileField] = Field(
        default=[], description="files of blocked prefixes, one a line, # comments (default none)"
    )
    allow_files: list[PrefixFileField] = Field(
        default=[], description="files of allowed prefixes, one a line, # comments (default none)"
    )
    unlisted: Action = Field(
        default="allow", description="numbers no prefix matches: allow, or block (only allowed ones pass)"
    )
    non_number: Action = Field(
        default="allow", description="callees that are not a telephone number (sip:alice@...): allow or block"
    )

    @cached_property  # (in the instance's __dict__: a private attribute costs ~2 us a read)
    def table(self) -> PrefixTable:
        """Every list in one table: the longest prefix decides."""
        lists = [_inline("block", self.block), _inline("allow", self.allow)]
        lists += [ListedPrefixes("block", str(listed.path), listed.lines) for listed in self.block_files]
        lists += [ListedPrefixes("allow", str(listed.path), listed.lines) for listed in self.allow_files]
        return PrefixTable(lists)

    @model_validator(mode="after")
    def _compile(self) -> DestinationsConfig:
        self.table  # noqa: B018 - built now, so a prefix both allowed and blocked is a load error
        return self


class DestinationsPolicy(Policy[DestinationsConfig]):
    name = "destinations"
    Config = DestinationsConfig
    description = "destination prefixes blocked and allowed, longest match"

    def keeps_counters(self, config: DestinationsConfig) -> bool:
        return False

    def check(self, call: CallContext, config: DestinationsConfig) -> Verdict:
        number = call.dialled_number()
        if number is None:
            if config.non_number == "allow":
                return ALLOW
            return Deny(f"callee {call.callee_presented} is not a telephone number")
        found = config.table.longest_match(number)
        if found is None:
            return ALLOW if config.unlisted == "allow" else Deny(f"{number} is in no allowed prefix")
        prefix, listed = found
        if listed.action == "allow":
            return ALLOW
        return Deny(f"{number} is in blocked prefix {prefix} ({listed.where(prefix)})")

    def warnings(self, config: DestinationsConfig) -> list[str]:
        if not len(config.table) and config.unlisted == "allow" and config.non_number == "allow":
            return ["destinations lists no prefix (block, allow, block_files, allow_files): it never fires"]
        return []

    def describe(self, config: DestinationsConfig) -> list[str]:
        table = config.table
        counts = f"{table.blocked:,} blocked and {table.allowed:,} allowed prefixes"
        return [f"{counts}; unlisted numbers: {config.unlisted}"]


def _inline(action: Action, prefixes: list[str]) -> ListedPrefixes:
    """The ``block:`` or ``allow:`` list of the policy file, each prefix with its place."""
    places = {prefix: place for place, prefix in enumerate(prefixes)}
    return ListedPrefixes(action, action, places, in_file=False)
