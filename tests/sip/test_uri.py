"""SIP/SIPS/tel URIs: parsing, escapes, parameters, editing, strictness."""

from __future__ import annotations

import pytest

from proxy.sip.errors import ParseError
from proxy.sip.uri import OtherUri, SipUri, _parse_uri_general, parse_uri, split_hostport


def sip(text: str) -> SipUri:
    uri = parse_uri(text)
    assert isinstance(uri, SipUri)
    return uri


@pytest.mark.parametrize(("text", "scheme", "user", "password", "host", "port", "params",
                          "headers"), [
    ("sip:alice@example.com", "sip", "alice", None, "example.com", None, "", ""),
    ("sips:alice@example.com:5061", "sips", "alice", None, "example.com", 5061, "", ""),
    ("sip:example.com", "sip", None, None, "example.com", None, "", ""),
    ("sip:10.0.0.1:5060;transport=udp;lr", "sip", None, None, "10.0.0.1", 5060,
     ";transport=udp;lr", ""),
    ("sip:13800000001@10.1.2.3;user=phone", "sip", "13800000001", None, "10.1.2.3", None,
     ";user=phone", ""),
    ("sip:bob:secret@[2001:db8::1]:5070;maddr=239.1.1.1", "sip", "bob", "secret",
     "[2001:db8::1]", 5070, ";maddr=239.1.1.1", ""),
    ("sip:[::1]", "sip", None, None, "[::1]", None, "", ""),
    ("sip:alice@atlanta.com?subject=project%20x&priority=urgent", "sip", "alice", None,
     "atlanta.com", None, "", "subject=project%20x&priority=urgent"),
    ("SIP:Alice@Example.COM", "sip", "Alice", None, "Example.COM", None, "", ""),
    ("sip:+86-138;x=y@h", "sip", "+86-138;x=y", None, "h", None, "", ""),
    ("sip:a%40b@h;%6C%72", "sip", "a%40b", None, "h", None, ";%6C%72", ""),
    ("sip:bob:@h", "sip", "bob", "", "h", None, "", ""),
])
def test_sip_uri_components(text: str, scheme: str, user: str | None, password: str | None,
                            host: str, port: int | None, params: str, headers: str) -> None:
    uri = sip(text)
    assert (uri.scheme, uri.user, uri.password, uri.host, uri.port, uri.params, uri.headers) == (
        scheme, user, password, host, port, params, headers)
    # serialises back to what came in (scheme lower-cased)
    assert str(uri) == text[:text.index(":")].lower() + text[text.index(":"):]


def test_user_unescaped_decodes_every_escape_including_nul() -> None:
    assert sip("sip:%61lice@h").user_unescaped == "alice"
    assert sip("sip:null-%00-null@h").user_unescaped == "null-\x00-null"
    assert sip("sip:I%20have%20spaces@h").user_unescaped == "I have spaces"
    assert sip("sip:h").user_unescaped is None
    assert sip("sip:plain@h").user_unescaped == "plain"


def test_params_lookup() -> None:
    uri = sip("sip:h;Transport=TCP;lr;maddr=1.2.3.4;%6D%61ddr2=x")
    assert uri.param("transport") == "TCP"
    assert uri.param("TRANSPORT") == "TCP"
    assert uri.param("lr") == ""
    assert uri.has_param("lr")
    assert uri.param("maddr") == "1.2.3.4"
    assert uri.param("maddr2") == "x"  # escaped name
    assert uri.param("ttl") is None
    assert not uri.has_param("ttl")
    plain = sip("sip:h;lr;s7=AbC;TRANSPORT=udp;Maddr=10.0.0.1")  # no escape: the quick look
    assert (plain.param("transport"), plain.param("maddr"), plain.param("S7")) == (
        "udp", "10.0.0.1", "AbC")
    assert plain.param("ttl") is None and plain.param("lr") == ""
    assert plain.param("abc") is None  # in a value, not a key


def test_hostport() -> None:
    assert sip("sip:a@h:5060").hostport == "h:5060"
    assert sip("sip:a@[::1]").hostport == "[::1]"


def test_editing_returns_new_uris() -> None:
    uri = sip("sip:alice:pw@h:5060;user=phone;lr?x=y")
    changed = uri.with_user("700100000000001")
    assert str(changed) == "sip:700100000000001@h:5060;user=phone;lr?x=y"  # password dropped
    assert str(uri) == "sip:alice:pw@h:5060;user=phone;lr?x=y"
    assert str(uri.with_user(None)) == "sip:h:5060;user=phone;lr?x=y"
    assert str(uri.without_param("lr")) == "sip:alice:pw@h:5060;user=phone?x=y"
    assert str(uri.without_param("USER")) == "sip:alice:pw@h:5060;lr?x=y"


def test_equality_and_hash_follow_the_text() -> None:
    assert sip("sip:a@h") == sip("sip:a@h")
    assert sip("sip:a@h") != sip("sip:b@h")
    assert len({sip("sip:a@h"), sip("sip:a@h")}) == 1


@pytest.mark.parametrize(("text", "number", "params"), [
    ("tel:+8613800000001", "+8613800000001", ""),
    ("tel:+86-10-1234-5678;phone-context=+86", "+86-10-1234-5678", ";phone-context=+86"),
    ("tel:7042;phone-context=example.com", "7042", ";phone-context=example.com"),
    ("TEL:911", "911", ""),
])
def test_tel_uris(text: str, number: str, params: str) -> None:
    uri = sip(text)
    assert (uri.scheme, uri.user, uri.params) == ("tel", number, params)
    assert uri.host == ""
    assert str(uri) == "tel:" + text[4:]


def test_other_schemes_are_opaque() -> None:
    uri = parse_uri("http://www.example.com/a?b=c")
    assert isinstance(uri, OtherUri)
    assert uri.scheme == "http"
    assert str(uri) == "http://www.example.com/a?b=c"
    assert uri.user is None and uri.param("x") is None
    assert parse_uri("isbn:2983792873").scheme == "isbn"
    assert parse_uri("soap.beep://192.0.2.103:3002").scheme == "soap.beep"


@pytest.mark.parametrize("text", [
    "", "sip", ":x", "1sip:a@h", "sip:", "sip:a@", "sip:@h", "sip:a b@h", "sip:a@h h",
    "sip:a@h:0", "sip:a@h:65536", "sip:a@h:123456", "sip:a@h:", "sip:a@h:5o60", "sip:a@h:\u00b2",
    "sip:a@-h", "sip:a@h-", "sip:a@[::1", "sip:a@[zz]", "sip:a@h;", "sip:a@h;=x", "sip:a@h;a b",
    "sip:a<b@h", "sip:a\"b@h", "sip:a%zzb@h", "sip:a%4@h", "sip:a@h?x y", "sip:a@h;p=%z",
    "sip:a:p w@h", "sip:a@h\x00", "sip:a\x00@h", "tel:", "tel:12 34", "tel:+86;a b",
    "http://a b", "http:\x01", "mailto:<a>", "sip:a@h@i",
])
def test_malformed_uris_raise_parse_error(text: str) -> None:
    with pytest.raises(ParseError):
        parse_uri(text)


@pytest.mark.parametrize("text", [
    "sip:alice@example.com", "sips:a@h:5061;transport=tls", "sip:h;lr", "sip:[::1]:5060",
    "sip:a%20b@h", "sip:a:b@h", "sip:a@h?x=y", "sip:a@h;p=%41", "sip:user;par=u%40e.net@h",
])
def test_fast_path_matches_general_parser(text: str) -> None:
    fast, general = parse_uri(text), _parse_uri_general(text)
    assert isinstance(fast, SipUri) and isinstance(general, SipUri)
    assert (fast.scheme, fast.user, fast.password, fast.host, fast.port, fast.params,
            fast.headers) == (general.scheme, general.user, general.password, general.host,
                              general.port, general.params, general.headers)


@pytest.mark.parametrize(("text", "expected"), [
    ("h", ("h", None)), ("h:5060", ("h", 5060)), ("[::1]:5", ("[::1]", 5)),
    ("[::1]", ("[::1]", None)), ("1.2.3.4:65535", ("1.2.3.4", 65535)),
    ("h:0", (None, None)), ("h:65536", (None, None)), ("h:x", (None, None)),
    ("h:\u00b2", (None, None)), ("[::1", (None, None)), ("[::1]x", (None, None)),
    ("", (None, None)), (":5060", (None, None)), ("h:-1", (None, None)),
])
def test_split_hostport(text: str, expected: tuple[str | None, int | None]) -> None:
    assert split_hostport(text) == expected
