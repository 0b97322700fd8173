"""Gateway names resolved as RFC 3263 says, against a real DNS server on loopback (a stub
this test runs) and the system's resolver (`localhost`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from proxy.dns import DnsError, GatewayResolver, make_resolver, resolve_gateway
from proxy.gateways import Gateway
from tests.dnsstub import DnsStub


def named(host: str, port: int = 5060, explicit: bool = False, transport: str = "udp"
          ) -> Gateway:
    return Gateway(f"sip:{host}", host, port, transport, by_name=True, explicit_port=explicit)


@pytest.fixture
def stub() -> Iterator[DnsStub]:
    server = DnsStub({
        ("naptr.test", "NAPTR"): [
            '20 10 "s" "SIP+D2T" "" _sip._tcp.naptr.test.',
            '10 10 "s" "SIP+D2U" "" _sip._udp.naptr.test.'],
        ("_sip._udp.naptr.test", "SRV"): ["10 10 5071 b.test.", "5 10 5070 a.test."],
        ("_sip._udp.srv.test", "SRV"): ["1 1 5072 a.test."],
        ("srv.test", "A"): ["127.0.0.99"],
        ("a.test", "A"): ["127.0.0.1"],
        ("b.test", "A"): ["127.0.0.2"],
        ("b.test", "AAAA"): ["::1"],
        ("plain.test", "A"): ["127.0.0.3"],
    })
    yield server
    server.close()


def resolve(stub: DnsStub, gw: Gateway) -> list[tuple[str, int]]:
    async def go() -> list[tuple[str, int]]:
        return (await resolve_gateway(make_resolver([stub.server], 1.0), gw)).addresses
    return asyncio.run(go())


def test_naptr_then_srv_by_priority_then_addresses(stub: DnsStub) -> None:
    assert resolve(stub, named("naptr.test")) == [
        ("127.0.0.1", 5070), ("127.0.0.2", 5071), ("::1", 5071)]
    assert ("naptr.test", "NAPTR") in stub.queries


def test_srv_without_naptr(stub: DnsStub) -> None:
    assert resolve(stub, named("srv.test")) == [("127.0.0.1", 5072)]  # SRV beats the A record


def test_no_srv_falls_back_to_the_address_on_5060(stub: DnsStub) -> None:
    assert resolve(stub, named("plain.test")) == [("127.0.0.3", 5060)]


def test_an_explicit_port_asks_for_addresses_only(stub: DnsStub) -> None:
    assert resolve(stub, named("srv.test", 5099, explicit=True)) == [("127.0.0.99", 5099)]
    assert not [q for q in stub.queries if q[1] in ("NAPTR", "SRV")]


def test_an_unknown_name_is_an_error(stub: DnsStub) -> None:
    with pytest.raises(DnsError, match=r"nowhere\.test"):
        resolve(stub, named("nowhere.test", 5060, explicit=True))


def test_localhost_through_the_system_resolver() -> None:
    async def go() -> list[tuple[str, int]]:
        return (await resolve_gateway(make_resolver([], 1.0),
                                      named("localhost", 5090, explicit=True))).addresses
    assert ("127.0.0.1", 5090) in asyncio.run(go())


def test_addresses_are_refreshed_when_the_record_changes(stub: DnsStub,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import proxy.dns as dnsmod
    monkeypatch.setattr(dnsmod, "MIN_TTL", 0.05)
    stub.ttl = 0
    gw = named("plain.test", 5070, explicit=True)
    changes: list[list[tuple[str, int]]] = []

    async def go() -> None:
        names = GatewayResolver([gw], make_resolver([stub.server], 1.0),
                                on_change=lambda: changes.append(list(gw.addresses)))
        assert await names.resolve_all() == []
        stub.records[("plain.test", "A")] = ["127.0.0.4"]
        for _ in range(100):
            await asyncio.sleep(0.02)
            if gw.addresses == [("127.0.0.4", 5070)]:
                break
        names.close()

    asyncio.run(go())
    assert gw.addresses == [("127.0.0.4", 5070)]
    assert changes[0] == [("127.0.0.3", 5070)] and changes[-1] == [("127.0.0.4", 5070)]
