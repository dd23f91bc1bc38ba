"""Telephone numbers (policies/numbering.py): what a URI dials, E.164 normalisation,
owned-number sets and emergency numbers.

URIs are parsed with proxy.sip.parse_uri, as the engine sees them; numbers used as
valid ones are NANP 555-01xx numbers and UK Ofcom drama numbers.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.numbering import (
    EmergencyNumbers,
    NumberSet,
    dialled_digits,
    is_anonymous,
    normalise,
    overlapping_pairs,
)
from proxy.sip import parse_uri

DEFAULT_EMERGENCY = ["911", "112", "999", "000", "110", "119", "933", "988"]


# -- what a URI dials --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("uri", "digits"),
    [
        ("sip:+14155550100@gw.example.com", "+14155550100"),
        ("sips:+14155550100@gw.example.com", "+14155550100"),
        ("sip:4155550100@gw.example.com;user=phone", "4155550100"),
        # RFC 3966 visual separators
        ("sip:+1-415-555-0100@gw.example.com;user=phone", "+14155550100"),
        ("sip:(415)555-0100@gw.example.com", "4155550100"),
        ("sip:415.555.0100@gw.example.com", "4155550100"),
        # RFC 4904 trunk group parameters ride in the user part
        ("sip:+14155550100;tgrp=TG-1;trunk-context=+1-415@gw.example.com;user=phone", "+14155550100"),
        ("sip:4155550100;trunk-context=example.com@gw.example.com", "4155550100"),
        # %-escaped +
        ("sip:%2B14155550100@gw.example.com", "+14155550100"),
        # tel: URIs, with separators and parameters
        ("tel:+1-415-555-0100", "+14155550100"),
        ("tel:+1.415.555.0100;ext=12", "+14155550100"),
        ("tel:911", "911"),
        # RFC 3966 §5.1.5: a local number in a global number's context dials that number
        ("tel:555-0100;phone-context=+1-415", "+14155550100"),
        ("tel:2025550142;Phone-Context=+49", "+492025550142"),
        ("sip:2025550142;phone-context=+49@gw.example.com;user=phone", "+492025550142"),
        ("tel:+14155550100;phone-context=+49", "+14155550100"),  # a global number has no context
        ("tel:4155550100;phone-context=example.com", "4155550100"),  # a private context adds no digits
    ],
)
def test_dialled_digits(uri: str, digits: str) -> None:
    assert dialled_digits(parse_uri(uri)) == digits


@pytest.mark.parametrize(
    "uri",
    [
        "sip:alice@example.com",
        "sip:alice@example.com;user=phone",  # user=phone does not make letters a number
        "sip:*67@example.com",
        "sip:+1415555010a@example.com",
        "sip:example.com",  # no user part
        "urn:service:sos",
        "http:example.com",
    ],
)
def test_uris_that_dial_no_number(uri: str) -> None:
    assert dialled_digits(parse_uri(uri)) is None


# -- E.164 normalisation ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("digits", "region", "e164"),
    [
        ("+14155550100", "US", "+14155550100"),
        ("+14155550100", "GB", "+14155550100"),  # international form: region ignored
        ("4155550100", "US", "+14155550100"),  # national
        ("14155550100", "US", "+14155550100"),  # national with trunk prefix 1
        ("02079460958", "GB", "+442079460958"),  # national with trunk prefix 0
        ("011442079460958", "US", "+442079460958"),  # US international dialling prefix
        ("00442079460958", "DE", "+442079460958"),  # European international dialling prefix
        ("4155550100", "us", "+14155550100"),  # region in any case
    ],
)
def test_normalise_to_e164(digits: str, region: str, e164: str) -> None:
    result = normalise(digits, region)
    assert (result.e164, result.problem, result.presented) == (e164, None, digits)


@pytest.mark.parametrize(
    "digits",
    [
        "+1415555",  # too short
        "+19995550100",  # no area code 999
        "+10005550100",
        "5550100",  # a local number without an area code
        "911",  # a short code, not an E.164 number
    ],
)
def test_numbers_that_cannot_exist(digits: str) -> None:
    result = normalise(digits, "US")
    assert result.e164 is None
    assert result.problem == "number cannot exist"


def test_an_unparseable_number_is_not_a_telephone_number() -> None:
    assert normalise("+", "US").problem == "not a telephone number"


def test_visual_separator_forms_normalise_alike() -> None:
    forms = [
        "sip:+1-415-555-0100@gw.example.com",
        "sip:(415)555-0100@gw.example.com",
        "sip:415.555.0100@gw.example.com;user=phone",
        "sip:1-415-555-0100;tgrp=a;trunk-context=b.example@gw.example.com",
        "tel:+1-415-555-0100",
    ]
    numbers = {normalise(dialled_digits(parse_uri(uri)) or "", "US").e164 for uri in forms}
    assert numbers == {"+14155550100"}


# -- anonymity --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("uri", "display_name"),
    [
        ("sip:anonymous@anonymous.invalid", None),
        ("sip:Anonymous@anonymous.invalid", "Anonymous"),
        ("sip:restricted@example.com", None),
        ("sip:unavailable@example.com", None),
        ("sip:user@anonymous.invalid", None),
        ("sip:pbx.example.com", "Anonymous"),
    ],
)
def test_anonymous_identities(uri: str, display_name: str | None) -> None:
    assert is_anonymous(parse_uri(uri), display_name)


@pytest.mark.parametrize(
    ("uri", "display_name"),
    [
        ("sip:+14155550100@example.com", None),
        ("sip:alice@example.com", "Alice"),
        ("urn:service:sos", "anonymous"),
        # a URI that carries a number is checked as that number, whatever it is called:
        # otherwise "Anonymous" <sip:+1NOT-OWNED@...> would slip past the caller-ID check
        ("sip:+14155550100@example.com", "Anonymous"),
        ("sip:+14155550100@anonymous.invalid", None),
        ("tel:+14155550100", "anonymous"),
        # nor does junk around the digits make a number anonymous: a PBX may drop the
        # junk (a C string ends at %00) and present the number
        ("sip:+14155550100%00@example.com", "Anonymous"),
        ("sip:+14155550100%00@anonymous.invalid", None),
        ("sip:4155550100x@example.com", "Anonymous"),
        ("tel:*67+14155550100", "Anonymous"),
    ],
)
def test_not_anonymous(uri: str, display_name: str | None) -> None:
    assert not is_anonymous(parse_uri(uri), display_name)


# -- owned-number sets -------------------------------------------------------------------------
def test_exact_numbers_in_any_form() -> None:
    numbers = NumberSet(["+14155559999", "(415) 555-0142", "1-415-555-0143", "+44 20 7946 0958"], "US")
    assert numbers.exact == {"+14155559999", "+14155550142", "+14155550143", "+442079460958"}
    assert "+14155559999" in numbers
    assert "+14155559998" not in numbers
    assert "14155559999" not in numbers  # lookups take E.164 only


def test_exact_numbers_use_the_region_given() -> None:
    assert "+442079460958" in NumberSet(["020 7946 0958"], "GB")


def test_prefix_membership() -> None:
    numbers = NumberSet(["+1415555123*"], "US")
    assert "+14155551230" in numbers
    assert "+14155551239" in numbers
    assert "+14155551240" not in numbers
    assert "+14155551229" not in numbers
    assert "+1415555123" in numbers  # the prefix itself
    assert "+1415555" not in numbers


@pytest.mark.parametrize(
    "spec",
    [
        "+14155550100-+14155550199",
        "+14155550100 - +14155550199",
        "4155550100-4155550199",  # national form, region US
        "14155550100-14155550199",
    ],
)
def test_range_membership_and_boundaries(spec: str) -> None:
    numbers = NumberSet([spec], "US")
    assert "+14155550100" in numbers
    assert "+14155550150" in numbers
    assert "+14155550199" in numbers
    assert "+14155550099" not in numbers
    assert "+14155550200" not in numbers
    assert "+141555501000" not in numbers  # one digit longer
    assert len(numbers) == 100


def test_range_in_national_form_of_another_region() -> None:
    numbers = NumberSet(["02079460000-02079460999"], "GB")
    assert "+442079460000" in numbers
    assert "+442079460999" in numbers
    assert "+442079461000" not in numbers


def test_adjacent_and_overlapping_ranges_merge() -> None:
    numbers = NumberSet(
        ["+14155550100-+14155550149", "+14155550150-+14155550199", "+14155550120-+14155550130"], "US"
    )
    assert numbers.ranges == {11: ([14155550100], [14155550199])}
    assert "+14155550149" in numbers
    assert "+14155550150" in numbers
    assert len(numbers) == 100


def test_disjoint_ranges_each_keep_their_boundaries() -> None:
    numbers = NumberSet(["+14155550300-+14155550399", "+14155550100-+14155550199"], "US")
    assert "+14155550199" in numbers
    assert "+14155550200" not in numbers
    assert "+14155550299" not in numbers
    assert "+14155550300" in numbers
    assert "+14155550099" not in numbers
    assert "+14155550400" not in numbers


def test_non_strings_are_never_members() -> None:
    numbers = NumberSet(["+14155550100-+14155550199", "+1415*"], "US")
    assert 14155550100 not in numbers
    assert None not in numbers


# Ranges whose endpoints are real numbers, in countries that write numbers differently:
# a national prefix phonenumbers strips (GB, DE, RU, FR, AU), variable lengths (DE), a
# leading 0 that stays (IT).
RANGES_BY_COUNTRY = [
    "+14155550000-+14155559999",
    "+442071234000-+442071239999",
    "+4930123400-+4930123499",
    "+390612345000-+390612345999",
    "+74951234500-+74951234599",
    "+33142685300-+33142685399",
    "+61212345000-+61212345999",
]


@settings(max_examples=300)
@given(
    spec=st.sampled_from(RANGES_BY_COUNTRY),
    offset=st.integers(-2000, 2000),
    extra=st.text("0123456789", max_size=2),
)
def test_text_a_set_lists_is_the_number_phonenumbers_would_write(spec: str, offset: int, extra: str) -> None:
    # The engine takes text the account lists as already normalised; it must never be
    # a second spelling of a number (two spellings would mean two per-number counters).
    numbers = NumberSet([spec], "US")
    low = spec.split("-")[0]
    text = f"+{int(low[1:]) + offset}{extra}"
    normalised = normalise(text, "US")
    if numbers.lists(text):
        assert normalised.e164 in (text, None)  # None: the library calls it unreal; owned wins
    elif normalised.e164 == text:
        assert text not in numbers  # and an owned number in E.164 is always listed


def test_only_exact_numbers_and_ranges_list_text_as_written() -> None:
    numbers = NumberSet(["+14155559999", "+14155550100-+14155550199", "+44*"], "US")
    assert numbers.lists("+14155559999")
    assert numbers.lists("+14155550150")
    assert not numbers.lists("+14155550200")
    assert not numbers.lists("14155550150")  # national or bare forms go through phonenumbers
    assert not numbers.lists("+014155550150")
    # a prefix matches spellings phonenumbers would rewrite (+44 0 20... is +44 20...)
    assert "+4402079460000" in numbers
    assert not numbers.lists("+4402079460000")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("+14155550199-+14155550100", "must run low to high"),
        ("+19995550100", "number cannot exist"),
        ("not-a-number", "not a telephone number"),
        ("415555*", "must be + and digits, then *"),
        ("+1415x*", "must be + and digits, then *"),
        ("+19995550100-+19995550199", "number cannot exist"),
        ("+14155550100-+1415555019", "not a telephone number"),  # unequal lengths: not a range
        # phonenumbers drops a * inside a number: +1415555*0100 used to own +14155550100 alone
        ("+1415555*0100", "'+1415555*0100': * may only end a prefix (+1415555*)"),
        ("+1415555**", "'+1415555**': * may only end a prefix (+1415555*)"),
        ("*4155550100", "'*4155550100': * may only end a prefix (+1415555*)"),
    ],
)
def test_bad_number_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        NumberSet([spec], "US")


def test_describe() -> None:
    numbers = NumberSet(["+14155559999", "+14155550100-+14155550199", "+1415555123*"], "US")
    assert numbers.describe() == "1 numbers, 1 ranges, 1 prefixes"
    assert len(numbers) == 101
    assert NumberSet([], "US").describe() == "none"


@pytest.mark.parametrize(
    ("first", "second", "shared"),
    [
        (["+14155550100"], ["+14155550101"], []),
        (["+14155550100"], ["+14155550100"], ["+14155550100"]),
        (["+14155550150"], ["+14155550100-+14155550199"], ["+14155550150"]),
        (["+14155551234"], ["+1415555123*"], ["+14155551234"]),
        (
            ["+14155550100-+14155550199"],
            ["+14155550150-+14155550249"],
            ["+14155550150-+14155550199"],
        ),
        (["+14155550100-+14155550199"], ["+14155550200-+14155550299"], []),
        (["+1415555*"], ["+1415555123*"], ["+1415555123*"]),
        (["+1415555*"], ["+1415556*"], []),
        # a prefix and a range of numbers that start with it
        (["+1415555012*"], ["+14155550100-+14155550199"], ["+14155550120-+14155550129"]),
        (["+14155550100-+14155550199"], ["+141555501*"], ["+14155550100-+14155550199"]),
        (["+1415555019*"], ["+14155550100-+14155550195"], ["+14155550190-+14155550195"]),
        (["+1415555020*"], ["+14155550100-+14155550199"], []),
    ],
)
def test_overlaps(first: list[str], second: list[str], shared: list[str]) -> None:
    one, other = NumberSet(first, "US"), NumberSet(second, "US")
    assert one.overlaps(other) == shared
    assert other.overlaps(one) == shared


# Specs over one 555-01xx block, so that sets drawn at random often share numbers.
_SPECS = st.one_of(
    st.integers(100, 199).map(lambda n: f"+1415555{n:04d}"),
    st.tuples(st.integers(100, 199), st.integers(0, 30)).map(
        lambda r: f"+1415555{r[0]:04d}-+1415555{min(199, r[0] + r[1]):04d}"
    ),
    st.integers(10, 19).map(lambda n: f"+14155550{n}*"),
    st.sampled_from(["+1415555*", "+141555501*", "+1415555019*", "+1415556*"]),
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from("abcdef"), st.lists(_SPECS, max_size=4), max_size=6))
def test_overlapping_pairs_finds_exactly_the_pairs_that_share_a_number(specs: dict[str, list[str]]) -> None:
    sets = {name: NumberSet(listed, "US") for name, listed in specs.items()}
    names = sorted(sets)
    compared = [
        (first, second)
        for index, first in enumerate(names)
        for second in names[index + 1 :]
        if sets[first].overlaps(sets[second])
    ]
    assert overlapping_pairs(sets) == compared


# -- emergency numbers ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("uri", "region"),
    [
        ("sip:911@pbx.example.com", "US"),
        ("sip:911@pbx.example.com;user=phone", "US"),
        ("sip:112@pbx.example.com", "DE"),
        ("sip:112@pbx.example.com", "US"),  # the list, not the region, says what is emergency
        ("tel:911", "US"),
        ("tel:+1911", "US"),  # global form: its national number is 911
        ("sip:+1911@pbx.example.com;user=phone", "US"),
        ("tel:+44999", "GB"),
        ("tel:+49112", "DE"),
        ("tel:+61000", "AU"),  # national number 000: leading zeros count
        ("sip:000@pbx.example.com", "AU"),
        ("urn:service:sos", "US"),  # RFC 5031
        ("urn:service:sos.fire", "US"),
        ("URN:Service:SOS.police", "US"),
        # in a phone-context: dialled as written (911 in +1-415) or as the number it makes
        ("tel:911;phone-context=+1-415", "US"),
        ("sip:112;phone-context=+49@pbx.example.com;user=phone", "US"),
        ("tel:999;phone-context=+44", "US"),
    ],
)
def test_emergency_calls(uri: str, region: str) -> None:
    assert EmergencyNumbers(DEFAULT_EMERGENCY).matches(parse_uri(uri), region)


@pytest.mark.parametrize(
    ("uri", "region"),
    [
        ("sip:+14155550100@pbx.example.com", "US"),
        ("sip:4155550911@pbx.example.com", "US"),
        ("sip:9110@pbx.example.com", "US"),
        ("sip:1911@pbx.example.com", "US"),
        ("tel:+390112", "IT"),  # national number 0112 (Turin), not 112
        ("sip:alice@pbx.example.com", "US"),
        ("urn:service:counseling", "US"),
        ("http:sos.example.com", "US"),
    ],
)
def test_not_emergency_calls(uri: str, region: str) -> None:
    assert not EmergencyNumbers(DEFAULT_EMERGENCY).matches(parse_uri(uri), region)


def test_emergency_numbers_given_with_plus() -> None:
    emergency = EmergencyNumbers(["+911"])
    assert emergency.numbers == frozenset({"911"})
    assert emergency.matches(parse_uri("sip:911@pbx.example.com"), "US")
