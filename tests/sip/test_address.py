"""name-addr / addr-spec, Via, CSeq, header parameters and comma lists."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.sip.address import (
    _CSEQ,
    _NAME_ADDR_FAST,
    _PARAM_TIGHT,
    _PARAMS_TIGHT,
    _VIA_FAST,
    NameAddr,
    _list_spans,
    _parse_name_addr_general,
    _parse_params_general,
    _walk_spans,
    cseq_by_hand,
    find_param,
    name_addr_by_hand,
    parse_cseq,
    parse_name_addr,
    parse_params,
    parse_request_uri,
    parse_via,
    quote_display,
    split_list,
    uri_by_hand,
    via_by_hand,
)
from proxy.sip.errors import ParseError
from proxy.sip.uri import _SIP_FAST, SipUri, parse_uri


# ---- name-addr ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "display", "uri", "params"), [
    ('"Alice" <sip:alice@atlanta.com>;tag=1928301774', '"Alice"', "sip:alice@atlanta.com",
     [("tag", "1928301774")]),
    ("<sip:700100000000001@10.0.0.1;user=phone>", None, "sip:700100000000001@10.0.0.1;user=phone",
     []),
    ("Bob <sips:bob@biloxi.com:5061>", "Bob", "sips:bob@biloxi.com:5061", []),
    ("Anonymous Caller <sip:c@h> ; tag = abc ; expires=3600", "Anonymous Caller", "sip:c@h",
     [("tag", "abc"), ("expires", "3600")]),
    ("caller<sip:caller@example.com>;tag=323", "caller", "sip:caller@example.com",
     [("tag", "323")]),
    ('"A \\"quoted\\" name" <sip:a@h>', '"A \\"quoted\\" name"', "sip:a@h", []),
    ('"" <sip:a@h>', '""', "sip:a@h", []),
    ("<tel:+8613800000001>;tag=x", None, "tel:+8613800000001", [("tag", "x")]),
    ("<sip:a@h>;q=0.5;lr;+sip.instance=\"<urn:uuid:1>\"", None, "sip:a@h",
     [("q", "0.5"), ("lr", None), ("+sip.instance", '"<urn:uuid:1>"')]),
    ("<sip:a@h>;received=[2001:db8::1]", None, "sip:a@h", [("received", "[2001:db8::1]")]),
    ("sip:alice@atlanta.com;tag=88", None, "sip:alice@atlanta.com", [("tag", "88")]),
    ("sip:+19725552222@gw1.example.net;unknownparam", None, "sip:+19725552222@gw1.example.net",
     [("unknownparam", None)]),
    ("tel:+8613800000001;tag=7", None, "tel:+8613800000001", [("tag", "7")]),
    ("<http://www.example.com>;tag=3", None, "http://www.example.com", [("tag", "3")]),
    ('"\xe5\xbc\xa0\xe4\xb8\x89" <sip:a@h>', '"\xe5\xbc\xa0\xe4\xb8\x89"', "sip:a@h", []),
    ("<sip:a%20b@h;p=%41>", None, "sip:a%20b@h;p=%41", []),
])
def test_name_addr_forms(value: str, display: str | None, uri: str,
                         params: list[tuple[str, str | None]]) -> None:
    na = parse_name_addr(value)
    assert na.display == display
    assert str(na.uri) == uri
    assert na.params == params
    assert str(na) == value  # untouched: the raw text


def test_name_addr_accessors() -> None:
    na = parse_name_addr('"J \\"R\\"" <sip:j@h>;TAG=abc;x')
    assert na.tag == "abc"
    assert na.param("x") == ""
    assert na.param("X") == ""
    assert na.param("y") is None
    assert na.display_text == 'J "R"'
    assert parse_name_addr("Bob <sip:b@h>").display_text == "Bob"
    assert parse_name_addr("<sip:b@h>").display_text is None


def test_name_addr_edits() -> None:
    na = parse_name_addr('"13800000001" <sip:13800000001@10.1.2.3;user=phone>;tag=19')
    assert isinstance(na.uri, SipUri)
    hidden = na.replace(uri=na.uri.with_user("700100000000001"), display=None)
    assert str(hidden) == "<sip:700100000000001@10.1.2.3;user=phone>;tag=19"
    assert hidden.tag == "19"
    assert str(na.replace(display='"X"')) == '"X" <sip:13800000001@10.1.2.3;user=phone>;tag=19'
    assert str(na.replace(raw_params=";tag=2")) == (
        '"13800000001" <sip:13800000001@10.1.2.3;user=phone>;tag=2')
    retagged = parse_name_addr("<sip:a@h>;x=1;tag=old;y").with_tag("new")
    assert str(retagged) == "<sip:a@h>;x=1;y;tag=new"
    assert retagged.tag == "new"
    # an addr-spec comes back as name-addr, so URI parameters cannot turn into header ones
    spec = parse_name_addr("sip:a@h;tag=1")
    assert str(spec.replace(uri=parse_uri("sip:b@h;lr"))) == "<sip:b@h;lr>;tag=1"
    with pytest.raises(ParseError):
        na.replace(raw_params=";bad param")
    direct = NameAddr('"D"', parse_uri("sip:d@h"), ";tag=1")
    assert direct.params == [("tag", "1")] and str(direct) == '"D" <sip:d@h>;tag=1'
    assert quote_display('say "hi" \\o/') == '"say \\"hi\\" \\\\o/"'


@pytest.mark.parametrize("value", [
    "", "   ", '"unterminated <sip:a@h>', '"Bell" sip:a@h', "Bell, Alexander <sip:a@h>",
    "<sip:a@h", "< sip:a@h >", "<sip:a @h>", "sip:a@h?Route=x", "sip:a@h, sip:b@h",
    "<sip:a@h>;;", "<sip:a@h>;tag=", "<sip:a@h> garbage", "<sip:a@h>;tag=a b",
    "<sip:a@h:0>", "<sip:a@h:99999>", "<>", "<sip:>", '"a\x00b" <sip:a@h>', '"a\nb" <sip:a@h>',
    "Bo\x01b <sip:a@h>", "<sip:a@h>;t\xe9=1", "<sip:a@h>;tag=\"x", "<:a@h>",
])
def test_bad_name_addrs(value: str) -> None:
    with pytest.raises(ParseError):
        parse_name_addr(value)


@pytest.mark.parametrize("value", [
    '"Alice" <sip:alice@atlanta.com>;tag=1928301774', "<sip:a@h>", "Bob <sip:b@h:5060;lr>;x",
    "Two Words <sips:a@[::1]:5061;transport=tls>;tag=z", "sip:a@h;tag=1", "sip:h",
    "sip:a@h:5060;x;y=z", '"q\\"d" <sip:a@h>', "<sip:a%41@h>", "<sip:a@h>;tag=\"q\"",
])
def test_fast_path_matches_general_parser(value: str) -> None:
    fast, general = parse_name_addr(value), _parse_name_addr_general(value, "x")
    assert (fast.display, str(fast.uri), fast.raw_params, fast.params, str(fast)) == (
        general.display, str(general.uri), general.raw_params, general.params, str(general))


# ---- Via ----------------------------------------------------------------------------------------
def test_via_common_form() -> None:
    via = parse_via("SIP/2.0/UDP 10.1.2.3:5060;branch=z9hG4bK776asdhds;rport;received=10.9.9.9")
    assert (via.protocol, via.transport, via.host, via.port) == ("SIP/2.0", "UDP", "10.1.2.3",
                                                                  5060)
    assert via.sent_by == "10.1.2.3:5060"
    assert via.branch == "z9hG4bK776asdhds"
    assert via.has_magic_cookie
    assert via.rport == ""
    assert via.received == "10.9.9.9"
    assert via.maddr is None
    assert via.param("BRANCH") == "z9hG4bK776asdhds"
    assert str(via) == "SIP/2.0/UDP 10.1.2.3:5060;branch=z9hG4bK776asdhds;rport;received=10.9.9.9"


def test_via_with_lws_ipv6_and_maddr() -> None:
    via = parse_via("SIP / 2.0 / tcp  [2001:db8::9] : 5070 ; branch = z9hG4bKx ; maddr=239.0.0.1"
                    " ;ttl=1;rport=5080;received=[2001:db8::8]")
    assert (via.transport, via.host, via.port) == ("TCP", "[2001:db8::9]", 5070)
    assert via.branch == "z9hG4bKx"
    assert via.maddr == "239.0.0.1"
    assert via.rport == "5080"
    assert via.received == "[2001:db8::8]"
    assert via.response_address(("192.0.2.1", 1234)) == ("192.0.2.1", 1234)  # rport: source


def test_via_response_address_without_rport() -> None:
    assert parse_via("SIP/2.0/UDP h;branch=z9hG4bKa").response_address(("1.1.1.1", 9)) == (
        "h", 5060)
    assert parse_via("SIP/2.0/TLS h;branch=z9hG4bKa").response_address(("1.1.1.1", 9)) == (
        "h", 5061)
    assert parse_via("SIP/2.0/UDP h:5070;received=10.0.0.9").response_address(("1.1.1.1", 9)) == (
        "10.0.0.9", 5070)
    assert parse_via("SIP/2.0/UDP [::1]").response_address(("1.1.1.1", 9)) == ("::1", 5060)


def test_via_magic_cookie() -> None:
    assert not parse_via("SIP/2.0/UDP h;branch=z9hG4bK").has_magic_cookie
    assert not parse_via("SIP/2.0/UDP h;branch=390skdjuw").has_magic_cookie
    assert not parse_via("SIP/2.0/UDP h").has_magic_cookie
    assert parse_via("SIP/2.0/UDP h;branch=z9hG4bK1").has_magic_cookie


def test_via_other_protocol_version_is_readable() -> None:
    via = parse_via("SIP/7.0/UDP c.example.com;branch=z9hG4bKkdjuw")
    assert via.protocol == "SIP/7.0"
    assert via.host == "c.example.com"


@pytest.mark.parametrize("value", [
    "", "SIP/2.0/UDP", "SIP/2.0/UDP ", "SIP/2.0 UDP h", "SIP/2.0/UDPh", "SIP/2.0/UDP h:0",
    "SIP/2.0/UDP h:65536", "SIP/2.0/UDP h:123456", "SIP/2.0/UDP h;;", "SIP/2.0/UDP h;branch=",
    "SIP/2.0/UDP -h", "SIP/2.0/UDP [::1", "SIP/2.0/UDP h x", "SIP/2.0/UDP h;branch=a b",
    "SIP/2.0/UDP 192.0.2.15;;,;,,", "SIP/2.0/UDP h:\u00b2", "SIP/2.0/UDP h\x00",
])
def test_bad_vias(value: str) -> None:
    with pytest.raises(ParseError):
        parse_via(value)


# ---- CSeq, params, lists -----------------------------------------------------------------------
def test_cseq() -> None:
    assert parse_cseq("314159 INVITE") == (314159, "INVITE")
    assert parse_cseq("  0009 \t INVITE ") == (9, "INVITE")
    assert parse_cseq("4294967295 BYE") == (4294967295, "BYE")
    for bad in ("4294967296 BYE", "36893488147419103232 REGISTER", "INVITE", "1", "-1 BYE",
                "1 IN VITE", "1\u00b2 BYE", "", "1 INVITE;x"):
        with pytest.raises(ParseError):
            parse_cseq(bad)


def test_params() -> None:
    assert parse_params("", "x") == []
    assert parse_params(";a=1;b;C=\"x;y\"", "x") == [("a", "1"), ("b", None), ("C", '"x;y"')]
    assert parse_params(" ; a = 1 ;b ", "x") == [("a", "1"), ("b", None)]
    assert find_param([("Tag", "1")], "tag") == "1"
    assert find_param([("lr", None)], "LR") == ""
    assert find_param([], "tag") is None
    for bad in (";", ";=1", ";a=", "a=1", ";a b", ";a=\"x", ";a=1,", ";a=<x>"):
        with pytest.raises(ParseError):
            parse_params(bad, "x")


def _params_by_regex(text: str) -> list[tuple[str, str | None]]:
    """parse_params as it was before its hand split: the regexes alone."""
    if _PARAMS_TIGHT.fullmatch(text):
        return [(k, v or None) for k, v in _PARAM_TIGHT.findall(text)]
    return _parse_params_general(text, "x")


def _outcome(parse: object, text: str) -> object:
    try:
        return parse(text)  # type: ignore[operator]
    except ParseError:
        return ParseError


@given(st.text(alphabet=";=aB1.-~ \t\"[]:%,é", max_size=14))
def test_params_hand_split_agrees_with_the_regexes(text: str) -> None:
    # the split by hand is a fast path: whatever it accepts the regexes read the same way, and
    # what it does not take (quoted or [IPv6] values, LWS, stray '=' or ';') they decide
    assert _outcome(lambda t: parse_params(t, "x"), text) == _outcome(_params_by_regex, text)


def test_params_hand_split_hands_over_what_is_not_a_token_list() -> None:
    assert parse_params(";a=\"x;y\";b", "x") == [("a", '"x;y"'), ("b", None)]
    assert parse_params(";maddr=[::1];lr", "x") == [("maddr", "[::1]"), ("lr", None)]
    for bad in (";a=b=c", ";a;;b", ";a;", ";é"):
        with pytest.raises(ParseError):
            parse_params(bad, "x")


def test_split_list_respects_quotes_and_angles() -> None:
    assert split_list("a, b ,c") == ["a", "b", "c"]
    assert split_list("single") == ["single"]
    assert split_list('"Bell, Alexander" <sip:a@h>, <sip:b@h;x=1,2>') == [
        '"Bell, Alexander" <sip:a@h>', "<sip:b@h;x=1,2>"]
    assert split_list('"a \\" , b" <sip:a@h>, <sip:c@h>') == [
        '"a \\" , b" <sip:a@h>', "<sip:c@h>"]
    assert split_list("a,,b") == ["a", "", "b"]


@given(st.text(alphabet='ab ,;"<>\\=:', max_size=40))
def test_split_list_fast_paths_agree_with_the_walk(value: str) -> None:
    """The fast paths (no comma; commas but no quote or angle bracket) split as the walk."""
    assert _list_spans(value) == _walk_spans(value)
    assert split_list(value) == [value[a:b].strip(" \t") for a, b in _walk_spans(value)]


# ---- the readings by hand (compiled, parse_via and parse_cseq try them before the regexes) ----
USUAL_VIAS = [
    "SIP/2.0/UDP 127.0.0.1:15061;branch=z9hG4bKs7.0.abc-1;rport=15061;received=127.0.0.1",
    "SIP/2.0/UDP 10.1.2.3:5060;branch=z9hG4bK-1;rport",
    "SIP/2.0/tcp pc33.example.com;branch=z9hG4bK776asdhds",
    "SIP/2.0/TLS h-1.example.:5061",
]


@pytest.mark.parametrize("value", USUAL_VIAS)
def test_usual_vias_are_read_by_hand_as_the_regex_reads_them(value: str) -> None:
    via = via_by_hand(value)
    assert via is not None  # the hand reading takes the usual shapes
    m = _VIA_FAST.fullmatch(value)
    assert m is not None
    transport, host, port, params = m.groups()
    assert (via.transport, via.host, via.port) == (transport.upper(), host,
                                                   int(port) if port else None)
    assert via.params == parse_params(params, "Via") and via.raw_params == params
    assert str(via) == value and str(parse_via(value)) == value


@given(st.text(alphabet="SIP/2.0UDtcp ;=:.-[]1ab,\"é\t", max_size=30)
       | st.sampled_from(USUAL_VIAS).map(lambda v: v[:len(v) // 2]))
def test_via_by_hand_accepts_only_what_the_regex_reads_the_same(text: str) -> None:
    via = via_by_hand(text)
    if via is None:
        return  # the regexes decide, as before
    m = _VIA_FAST.fullmatch(text)
    assert m is not None, text
    transport, host, port, params = m.groups()
    assert (via.transport, via.host, via.port, via.raw_params) == (
        transport.upper(), host, int(port) if port else None, params)
    assert via.params == _params_by_regex(params)


@pytest.mark.parametrize("value", ["1 INVITE", "314159 ACK", "4294967295 BYE", "7 X-Y.z"])
def test_usual_cseqs_are_read_by_hand_as_the_regex_reads_them(value: str) -> None:
    m = _CSEQ.fullmatch(value)
    assert m is not None and cseq_by_hand(value) == (int(m.group(1)), m.group(2))
    assert parse_cseq(value) == (int(m.group(1)), m.group(2))


@given(st.text(alphabet="0123456789 \tINVTEé²-", max_size=16))
def test_cseq_by_hand_accepts_only_what_the_regex_reads_the_same(text: str) -> None:
    found = cseq_by_hand(text)
    if found is not None:
        m = _CSEQ.fullmatch(text)
        assert m is not None and found == (int(m.group(1)), m.group(2)), text
    for bad in ("", "1", "1  INVITE", "²1 INVITE", "12345678901 INVITE", "1 INV ITE"):
        assert cseq_by_hand(bad) is None


@pytest.mark.parametrize("value", [
    "SIP/2.0/UDP h:000001", "SIP/2.0/UDP h:5²", "SIP/2.0/UDP h:0", "SIP/2.0/UDP h:65536",
    "SIP/2.0/UDP -h", "SIP/2.0/UDP .h", "SIP/2.0/UDP h-", "SIP/2.0/UDP hé", "SIP/2.0/UDP  h",
    "SIP/2.0/UDP [::1]:5060", "SIP/2.0/UDP h;a=\"q\"", "SIP/2.0/UDP h;;a", "SIP/2.0/U(P h",
    "SIP/2.0 /UDP h", "SIP/2.1/UDP h",
])
def test_via_by_hand_leaves_the_rest_to_the_regexes(value: str) -> None:
    assert via_by_hand(value) is None


USUAL_NAME_ADDRS = [
    "<sip:13800000001@127.0.0.1>;tag=4242SIPpTag001",
    "<sip:700100000000001@127.0.0.1:15060>",
    "<sip:uac@127.0.0.1:15080>",
    "<sip:127.0.0.1:15061;lr;s7=AbC-_0123>",
    "<sips:+86-138(0000)0001;phone-context=x@h.example.com:5061;transport=tls;lr>;a;b=c",
    "<sip:h;maddr=[::1]:5060>",
]


def _name_addr_by_regex(text: str) -> tuple[object, ...] | None:
    m = _NAME_ADDR_FAST.fullmatch(text)
    if m is None:
        return None
    quoted, tokens, scheme, user, host, port, uri_params, params = m.groups()
    if port is not None and not 0 < int(port) < 65536:
        return None
    return (quoted or tokens, scheme, user, host, int(port) if port else None, uri_params,
            params, _params_by_regex(params))


def _read(addr: NameAddr) -> tuple[object, ...]:
    uri = addr.uri
    assert isinstance(uri, SipUri)
    return (addr.display, uri.scheme, uri.user, uri.host, uri.port, uri.params,
            addr.raw_params, addr.params)


@pytest.mark.parametrize("value", USUAL_NAME_ADDRS)
def test_usual_name_addrs_are_read_by_hand_as_the_regex_reads_them(value: str) -> None:
    addr = name_addr_by_hand(value)
    assert addr is not None  # the hand reading takes the usual shapes
    assert _read(addr) == _name_addr_by_regex(value)
    assert str(addr) == value and str(addr.uri) == str(parse_name_addr(value).uri)


@given(st.text(alphabet="<>sip:@1.a;=-_[]\"é ,%", max_size=30)
       | st.sampled_from(USUAL_NAME_ADDRS).map(lambda v: v[:len(v) * 2 // 3]))
def test_name_addr_by_hand_accepts_only_what_the_regex_reads_the_same(text: str) -> None:
    addr = name_addr_by_hand(text)
    if addr is not None:
        assert _read(addr) == _name_addr_by_regex(text), text


@pytest.mark.parametrize("value", [
    '"A" <sip:a@h>', "A <sip:a@h>", "sip:a@h", "<sip:a%40b@h>", "<sip:@h>", "<sip:a@h:0>",
    "<sip:a@h:123456>", "<sip:a@-h>", "<sip:a@[::1]>", "<sip:a@h;=x>", "<sip:a@h;x y>",
    "<sip:a@h> ;tag=1", "<sip:a@h>;tag=", "<sip:a@h>x", "<tel:+861380000>", "<sip:a@h",
    "<sip:a@b@h>",
])
def test_name_addr_by_hand_leaves_the_rest_to_the_regexes(value: str) -> None:
    assert name_addr_by_hand(value) is None


# ---- the Request-URI by hand ---------------------------------------------------------------
USUAL_URIS = [
    "sip:700100000000001@127.0.0.1:15060",
    "sip:13900000001@10.0.0.2;user=phone",
    "sip:127.0.0.1:15070;transport=UDP",
    "sip:uac@127.0.0.1:15080",
    "sips:+86-138(0000)0001;phone-context=x@h.example.com:5061;transport=tls;lr",
    "sip:s7u.AbC-_0123@gw.example.com;maddr=[::1];lr",
    "sip:h",
]


def _uri_by_regex(text: str) -> tuple[object, ...] | None:
    m = _SIP_FAST.fullmatch(text)
    if m is None:
        return None
    scheme, user, host, port, params = m.groups()
    if port is not None and not 0 < int(port) < 65536:
        return None
    return (scheme, user, host, int(port) if port else None, params)


def _uri_read(uri: SipUri) -> tuple[object, ...]:
    return (uri.scheme, uri.user, uri.host, uri.port, uri.params)


@pytest.mark.parametrize("value", USUAL_URIS)
def test_usual_uris_are_read_by_hand_as_the_regex_reads_them(value: str) -> None:
    uri = uri_by_hand(value)
    assert uri is not None  # the hand reading takes the usual shapes
    assert _uri_read(uri) == _uri_by_regex(value)
    assert str(uri) == value == str(parse_uri(value)) == str(parse_request_uri(value))


@given(st.text(alphabet="sip:@1.a;=-_[]\"é ,%?>", max_size=30)
       | st.sampled_from(USUAL_URIS).map(lambda v: v[:len(v) * 2 // 3]))
def test_uri_by_hand_accepts_only_what_the_regex_reads_the_same(text: str) -> None:
    uri = uri_by_hand(text)
    if uri is not None:
        assert _uri_read(uri) == _uri_by_regex(text), text


@pytest.mark.parametrize("value", [
    "sip:a%40b@h", "sip:@h", "sip:a@h:0", "sip:a@h:123456", "sip:a@-h", "sip:a@[::1]",
    "sip:a@h;=x", "sip:a@h;x y", "sip:a@h?subject=x", "sip:a:pw@h", "tel:+861380000",
    "<sip:a@h>", "sip:a@b@h", "SIP:a@h",
])
def test_uri_by_hand_leaves_the_rest_to_parse_uri(value: str) -> None:
    assert uri_by_hand(value) is None


# ---- parsed values kept by their text ------------------------------------------------------------
def test_a_repeated_value_is_parsed_once_and_edits_do_not_reach_it() -> None:
    text = '"13800000001" <sip:13800000001@10.1.2.3;user=phone>;tag=19'
    first = parse_name_addr(text)
    assert parse_name_addr(text) is first  # a dialog's next message: no second parse
    hidden = first.replace(uri=first.uri.with_user("700100000000001"), display=None)
    again = parse_name_addr(text)
    assert again is first and str(again) == text and again.display == '"13800000001"'
    assert str(hidden) == "<sip:700100000000001@10.1.2.3;user=phone>;tag=19"
    # the text is the key, whitespace and case included: another text is parsed on its own
    assert parse_name_addr(" " + text) is not first and str(parse_name_addr(" " + text)) == text


def test_kept_values_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy.sip import address

    long_text = "<sip:a@h>;x=" + "y" * 300  # longer than _PARSED_MAX_TEXT: parsed every time
    assert parse_name_addr(long_text) is not parse_name_addr(long_text)
    assert str(parse_name_addr(long_text)) == long_text
    monkeypatch.setattr(address, "_PARSED_MAX_ENTRIES", 8)
    for i in range(20):
        parse_name_addr(f"<sip:{i}@h>;tag={i}")
        assert len(address._name_addrs) <= 8
    # what was dropped still parses, to the same value
    assert parse_name_addr("<sip:0@h>;tag=0").tag == "0"


def test_a_bad_value_is_refused_every_time() -> None:
    for _ in range(2):
        with pytest.raises(ParseError):
            parse_name_addr("<sip:a@h>;tag=a b")
        with pytest.raises(ParseError):
            parse_via("SIP/2.0/UDP h:99999;branch=z9hG4bK1")
