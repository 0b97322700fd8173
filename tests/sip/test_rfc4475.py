"""RFC 4475 torture messages: every file in tests/data/rfc4475 against what INDEX.tsv says."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from proxy.sip.errors import ParseError
from proxy.sip.message import SipMessage, build_response, parse_datagram
from proxy.sip.uri import OtherUri, SipUri

CORPUS = Path(__file__).resolve().parent.parent / "data" / "rfc4475"
with (CORPUS / "INDEX.tsv").open(newline="") as _f:
    INDEX = {row["file"][:-4]: row for row in csv.DictReader(_f, delimiter="\t")}

VALID = sorted(n for n, r in INDEX.items() if r["kind"] == "valid")
INVALID = sorted(n for n, r in INDEX.items() if r["kind"] == "invalid")
SEMANTIC = sorted(n for n, r in INDEX.items() if r["kind"] == "semantic")

# invalid messages a proxy may accept liberally (RFC 4475 says so); we reject all but baddate,
# whose bad Date the proxy never reads
LIBERAL_ACCEPTED = {"baddate"}
# semantic messages the parser itself rejects (the RFC's expected answer is a 400)
SEMANTIC_REJECTED = {"insuf", "multi01", "mcl01"}
# datagrams that carry octets past the message (dblreq) and the one without an empty line
FRAMED_LENGTH = {"dblreq": None}


def load(name: str) -> bytes:
    return (CORPUS / f"{name}.dat").read_bytes()


def parse_valid(name: str) -> SipMessage:
    msg = parse_datagram(load(name))
    assert msg is not None
    msg.validate()
    return msg


def test_index_covers_every_file() -> None:
    files = {p.stem for p in CORPUS.glob("*.dat")}
    assert files == set(INDEX)
    assert len(files) == 49


# ---- valid: parse, validate, values the RFC spells out ---------------------------------------
@pytest.mark.parametrize("name", VALID)
def test_valid_messages_parse_and_validate(name: str) -> None:
    msg = parse_valid(name)
    msg.top_via  # noqa: B018
    msg.from_  # noqa: B018
    msg.to  # noqa: B018


def test_wsinv_values() -> None:
    msg = parse_valid("wsinv")
    assert msg.method == "INVITE"
    assert str(msg.uri) == "sip:vivekg@chair-dnrc.example.com;unknownparam"
    assert msg.uri.has_param("unknownparam")
    assert str(msg.to.uri) == "sip:vivekg@chair-dnrc.example.com"
    assert msg.to.tag == "1918181833n"
    assert msg.from_.display == '"J Rosenberg \\\\\\""'
    assert msg.from_.display_text == 'J Rosenberg \\"'
    assert msg.from_.tag == "98asjd8"
    assert str(msg.from_.uri) == "sip:jdrosen@example.com"
    assert msg.max_forwards == 68
    assert msg.cseq == (9, "INVITE")
    assert msg.call_id == "wsinv.ndaksdj@192.0.2.1"
    vias = msg.vias
    assert [(v.transport, v.host, v.branch) for v in vias] == [
        ("UDP", "192.0.2.2", "390skdjuw"),
        ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
        ("UDP", "192.168.255.111", "z9hG4bK30239"),
    ]
    assert msg.top_via.branch == "390skdjuw"
    assert not msg.top_via.has_magic_cookie
    assert msg.header("NewFangledHeader") == "newfangled value continued newfangled value"
    assert msg.header("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    assert msg.header("s") == ""
    assert msg.header("subject") == ""
    (route,) = msg.name_addrs("route")
    assert route.uri.param("unknownwith") == "value"
    assert route.uri.has_param("lr") and route.uri.has_param("unknown-no-value")
    (contact,) = msg.name_addrs("m")
    assert contact.display_text == 'Quoted string ""'
    assert contact.params == [("newparam", "newvalue"), ("secondparam", None), ("q", "0.33")]
    assert msg.content_length == 150 == len(msg.body)


def test_intmeth_unusual_characters() -> None:
    msg = parse_valid("intmeth")
    assert msg.method == "!interesting-Method0123456789_*+`.%indeed'~"
    assert msg.cseq == (139122385, msg.method)
    uri = msg.uri
    assert isinstance(uri, SipUri)
    assert uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert uri.host == "example.com"
    assert msg.top_via.branch == "z9hG4bK-.!%66*_+`'~"
    assert msg.to.display_text == "BEL:\x07 NUL:\x00 DEL:\x7f"
    assert msg.from_.display == "token1~` token2'+_ token3*%!.-"
    assert msg.from_.tag == "_token~1'+`*%!-."
    param = msg.from_.param("fromParam''~+*_!.-%")
    assert param is not None
    assert param[1:-1].encode("latin-1").decode("utf-8") == "работающий"
    assert msg.call_id == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
    assert msg.max_forwards == 255
    value = msg.header("extensionHeader-!.%*+_`'~")
    assert value is not None
    assert value.encode("latin-1").decode("utf-8") == "\ufeff大停電"


def test_esc01_escapes_decoded_only_where_allowed() -> None:
    msg = parse_valid("esc01")
    assert isinstance(msg.uri, SipUri)
    assert msg.uri.user == "sips%3Auser%40example.com"
    assert msg.uri.user_unescaped == "sips:user@example.com"
    assert msg.uri.host == "example.net"
    assert msg.to.uri.user_unescaped == "user"
    assert msg.from_.uri.user_unescaped == "I have spaces"
    (contact,) = msg.name_addrs("contact")
    assert contact.uri.user_unescaped == "caller"
    assert contact.uri.has_param("lr")  # ;%6C%72
    assert msg.header("c") == "application/sdp"


def test_escnull_keeps_escaped_nulls() -> None:
    msg = parse_valid("escnull")
    assert msg.to.uri.user_unescaped == "null-\x00-null"
    assert msg.from_.uri.user_unescaped == "null-\x00-null"
    users = [c.uri.user_unescaped for c in msg.name_addrs("contact")]
    assert users == ["\x00", "\x00\x00"]
    assert msg.body == b""


def test_esc02_percent_that_is_not_an_escape() -> None:
    msg = parse_valid("esc02")
    assert msg.method == "RE%47IST%45R"
    assert msg.cseq == (29344, "RE%47IST%45R")
    assert msg.to.display_text == "%Z%45"
    assert msg.top_via.branch == "z9hG4bK209%fzsnel234"
    # C%6Fntact is another header, not Contact
    assert [str(c.uri) for c in msg.name_addrs("contact")] == [
        "sip:alias1@host1.example.com", "sip:alias3@host3.example.com"]
    assert msg.header("c%6fntact") == "<sip:alias2@host2.example.com>"


def test_lwsdisp_display_name_without_space() -> None:
    msg = parse_valid("lwsdisp")
    assert msg.from_.display == "caller"
    assert str(msg.from_.uri) == "sip:caller@example.com"
    assert msg.from_.tag == "323"


def test_longreq_long_values() -> None:
    data = load("longreq")
    assert len(data) == 3515
    msg = parse_valid("longreq")
    assert len(msg.to.display_text or "") == 103
    assert msg.to.uri.port == 6000
    assert msg.to.uri.param(
        "longparamnamenamenamenamenamenamenamenamenamenamenamenamenamenamenamenamename"
        "namenamenamenamenamenamenamename") == "shortvalue"
    assert len(msg.from_.uri.user or "") == 115
    assert len(msg.from_.tag or "") == 155
    assert len(msg.call_id) == 141
    vias = msg.vias
    assert len(vias) == 34
    assert len(vias[-1].branch or "") == 215
    assert vias[-1].received == "192.0.2.5"
    assert msg.count("via") == 34 and msg.count("v") == 34
    assert len(msg.body) == 150


def test_dblreq_ignores_trailing_octets() -> None:
    msg = parse_valid("dblreq")
    assert msg.method == "REGISTER"
    assert msg.body == b""
    assert msg.call_id == "dblreq.0ha0isndaksdj99sdfafnl3lk233412"
    assert b"INVITE" not in msg.serialize()


def test_semiuri_user_with_semicolons() -> None:
    msg = parse_valid("semiuri")
    assert isinstance(msg.uri, SipUri)
    assert msg.uri.user == "user;par=u%40example.net"
    assert msg.uri.user_unescaped == "user;par=u@example.net"
    assert msg.uri.host == "example.com"
    assert msg.uri.params == ""
    assert msg.header_values("accept") == [
        "application/sdp", "application/pkcs7-mime", "multipart/mixed", "multipart/signed",
        "message/sip", "message/sipfrag"]


def test_transports_unknown_transport_is_fine() -> None:
    msg = parse_valid("transports")
    assert [v.transport for v in msg.vias] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]
    assert [v.host for v in msg.vias] == [f"t{i}.example.com" for i in range(1, 6)]


def test_mpart01_binary_body() -> None:
    msg = parse_valid("mpart01")
    assert len(msg.body) == 553
    assert msg.body.count(b"\x00") == 2
    assert msg.header("content-type") == "multipart/mixed;boundary=7a9cbec02ceef655"


def test_unreason_utf8_reason_phrase() -> None:
    msg = parse_valid("unreason")
    assert msg.status == 200
    text = msg.reason.encode("latin-1").decode("utf-8")
    assert text == "= 2**3 * 5**2 но сто девяносто девять - простое"
    assert len(msg.body) == 154


def test_noreason_empty_reason_phrase() -> None:
    msg = parse_valid("noreason")
    assert (msg.status, msg.reason) == (100, "")
    assert msg.to.tag == "902jndnke3"


def test_inv2543_body_is_rest_of_datagram() -> None:
    data = load("inv2543")
    msg = parse_valid("inv2543")
    assert msg.body == data[data.index(b"\r\n\r\n") + 4:]
    assert msg.content_length is None
    assert msg.top_via.branch is None and not msg.top_via.has_magic_cookie
    assert msg.max_forwards is None
    assert msg.to.uri.param("user") is None  # addr-spec: ;user=phone is a header param
    assert msg.to.param("user") == "phone"
    assert msg.from_.uri.param("user") == "phone"
    assert msg.from_.tag is None


# ---- round trip --------------------------------------------------------------------------------
def framed_part(data: bytes, msg: SipMessage) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data[: end + 4 + len(msg.body)]


PARSEABLE = [n for n in sorted(INDEX) if n not in SEMANTIC_REJECTED
             and (INDEX[n]["kind"] != "invalid" or n in LIBERAL_ACCEPTED)]


@pytest.mark.parametrize("name", PARSEABLE)
def test_serialize_is_byte_exact(name: str) -> None:
    data = load(name)
    msg = parse_valid(name)
    wire = msg.serialize()
    if msg.content_length is None:
        assert wire == data[: data.index(b"\r\n\r\n") + 2] + (
            b"Content-Length: %d\r\n\r\n" % len(msg.body)) + msg.body
    else:
        assert wire == framed_part(data, msg)


# ---- invalid: the right ParseError -------------------------------------------------------------
def rejection(name: str) -> ParseError:
    with pytest.raises(ParseError) as info:
        msg = parse_datagram(load(name))
        assert msg is not None
        msg.validate()
    return info.value


EXPECTED_STATUS = {"badvers": 505, "mismatch02": 501}


@pytest.mark.parametrize("name", sorted(set(INVALID) - LIBERAL_ACCEPTED))
def test_invalid_messages_are_rejected(name: str) -> None:
    error = rejection(name)
    assert error.status == EXPECTED_STATUS.get(name, 400)
    expected = INDEX[name]["proxy_udp_expected"]
    if expected.startswith("response:"):
        assert not error.can_respond  # a proxy never answers a response
        return
    assert expected.startswith(("respond", "reject", "must not break"))
    assert error.message is not None
    try:
        error.message.top_via  # noqa: B018
        via_readable = True
    except ParseError:
        via_readable = False
    assert error.can_respond == via_readable
    if name != "badinv01":  # its Via is `SIP/2.0/UDP 192.0.2.15;;,;,,`: nothing to answer to
        assert error.can_respond


@pytest.mark.parametrize("name", sorted(set(INVALID) - LIBERAL_ACCEPTED))
def test_answerable_rejections_build_a_parseable_response(name: str) -> None:
    error = rejection(name)
    if not error.can_respond:
        return
    assert error.message is not None
    response = build_response(error.message, error.status, "Bad Request", to_tag="x1")
    again = parse_datagram(response.serialize())
    assert again is not None and again.status == error.status
    assert again.top_via.sent_by == error.message.top_via.sent_by


def test_specific_rejection_reasons() -> None:
    assert "Content-Length" in rejection("clerr").reason
    assert "Content-Length" in rejection("ncl").reason
    assert "CSeq" in rejection("scalar02").reason
    assert "CSeq" in rejection("scalarlg").reason
    assert "status code" in rejection("bigcode").reason
    assert "version" in rejection("badvers").reason
    assert "CSeq method" in rejection("mismatch01").reason
    assert "quoted" in rejection("quotbal").reason
    assert "Request-URI" in rejection("escruri").reason
    assert "request line" in rejection("lwsstart").reason
    assert "request line" in rejection("trws").reason
    assert "request line" in rejection("lwsruri").reason


def test_baddate_parses_and_keeps_the_date_unread() -> None:
    msg = parse_valid("baddate")
    assert msg.header("date") == "Fri, 01 Jan 2010 16:00:00 EST"
    assert msg.header_values("date") == ["Fri, 01 Jan 2010 16:00:00 EST"]


def test_badvers_505_answer_carries_the_via() -> None:
    error = rejection("badvers")
    assert error.status == 505 and error.can_respond
    assert error.message is not None
    assert error.message.top_via.protocol == "SIP/7.0"


# ---- semantic: parse, and the property the proxy checks is readable ---------------------------
@pytest.mark.parametrize("name", sorted(set(SEMANTIC) - SEMANTIC_REJECTED))
def test_semantic_messages_parse(name: str) -> None:
    parse_valid(name)


def test_zeromf() -> None:
    assert parse_valid("zeromf").max_forwards == 0


def test_unknown_schemes() -> None:
    for name, scheme in (("unkscm", "nobodyknowsthisscheme"), ("novelsc", "soap.beep")):
        uri = parse_valid(name).uri
        assert isinstance(uri, OtherUri)
        assert uri.scheme == scheme
    msg = parse_valid("unksm2")
    assert msg.to.uri.scheme == "isbn"
    assert msg.from_.uri.scheme == "http"
    assert [c.uri.scheme for c in msg.name_addrs("contact")] == ["name"]


def test_bext01_proxy_require() -> None:
    msg = parse_valid("bext01")
    assert msg.header_values("proxy-require") == ["noProxiesSupportThis",
                                                  "norDoAnyProxiesSupportThis"]
    assert msg.header_values("require") == ["nothingSupportsThis", "nothingSupportsThisEither"]


def test_badbranch_bare_magic_cookie() -> None:
    via = parse_valid("badbranch").top_via
    assert via.branch == "z9hG4bK"
    assert not via.has_magic_cookie


def test_bcast_via() -> None:
    msg = parse_valid("bcast")
    assert msg.status == 200
    assert [v.host for v in msg.vias] == ["192.0.2.198", "255.255.255.255"]


def test_contact_parameters() -> None:
    (c1,) = parse_valid("cparam01").name_addrs("contact")
    assert c1.params == [("unknownparam", None)]
    assert c1.uri.params == ""
    (c2,) = parse_valid("cparam02").name_addrs("contact")
    assert c2.params == []
    assert c2.uri.has_param("unknownparam")
    (c3,) = parse_valid("regescrt").name_addrs("contact")
    assert isinstance(c3.uri, SipUri)
    assert c3.uri.headers == "Route=%3Csip:sip.example.com%3E"


def test_regaut01_authorization_untouched() -> None:
    msg = parse_valid("regaut01")
    assert msg.header("authorization") == "NoOneKnowsThisScheme opaque-data=here"
    assert msg.serialize() == load("regaut01")


def test_invut_and_sdp01_forwardable() -> None:
    assert parse_valid("invut").header("content-type") == "application/unknownformat"
    assert parse_valid("sdp01").header("accept") == "text/nobodyKnowsThis"


@pytest.mark.parametrize(("name", "words"), [
    ("insuf", "missing"), ("multi01", "more than one"), ("mcl01", "Content-Length")])
def test_semantic_rejections(name: str, words: str) -> None:
    error = rejection(name)
    assert error.status == 400
    assert words in error.reason
    assert error.can_respond
