"""SSRF address policy, tested on the functions: no connection is ever opened here."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from mumic_batch.core import status
from mumic_batch.io.addresses import (
    check_ip,
    denial_reason,
    host_allowed,
    normalise_host,
    parse_ip_literal,
    parse_networks,
    resolve_destination,
)

NONE: tuple = ()


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0177.0.0.01", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("169.254.43518", "169.254.169.254"),
        ("0xa9fea9fe", "169.254.169.254"),
        ("10.0.0.1.", "10.0.0.1"),
        ("0", "0.0.0.0"),
        ("::ffff:127.0.0.1", "::ffff:7f00:1"),
        ("fd00:ec2::254", "fd00:ec2::254"),
    ],
)
def test_numeric_host_spellings_are_normalised(host: str, expected: str) -> None:
    assert parse_ip_literal(host) == ipaddress.ip_address(expected)


@pytest.mark.parametrize("host", ["example.com", "images.example.org", "1.2.3.com", "localhost"])
def test_names_are_not_literals(host: str) -> None:
    assert parse_ip_literal(host) is None


@pytest.mark.parametrize("host", ["256.0.0.1", "1.2.3.4.5", "0x1g.1", "09.1.1.1", "1..1", "::gg"])
def test_malformed_numeric_hosts_are_bad_uris(host: str) -> None:
    with pytest.raises(status.ImageError) as info:
        parse_ip_literal(host)
    assert info.value.status == status.BAD_URI


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254", "fd00:ec2::254", "100.100.100.200", "127.0.0.1", "127.255.255.254", "::1",
        "10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.1.1", "100.64.0.1", "0.0.0.0", "224.0.0.1",
        "255.255.255.255", "240.0.0.1", "fe80::1", "fc00::1", "ff02::1", "::", "::ffff:127.0.0.1",
        "::ffff:169.254.169.254", "::7f00:1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::", "2001:db8::1",
        "192.0.0.192", "198.18.0.1",
    ],
)
def test_internal_addresses_are_denied(address: str) -> None:
    ip = ipaddress.ip_address(address)
    assert denial_reason(ip) is not None
    with pytest.raises(status.ImageError) as info:
        check_ip(ip, NONE)
    assert info.value.status == status.BLOCKED_DESTINATION


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "151.101.1.69", "2606:4700::1111", "64:ff9b::808:808",
                                     "2002:808:808::", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address: str) -> None:
    assert denial_reason(ipaddress.ip_address(address)) is None


def test_allowed_networks_exempt_only_what_they_cover() -> None:
    allowed = parse_networks(["127.0.0.1/32", "10.1.0.0/16"])
    assert check_ip(ipaddress.ip_address("127.0.0.1"), allowed) == ipaddress.ip_address("127.0.0.1")
    assert check_ip(ipaddress.ip_address("::ffff:127.0.0.1"), allowed) == ipaddress.ip_address("127.0.0.1")
    assert check_ip(ipaddress.ip_address("10.1.2.3"), allowed)
    for address in ("127.0.0.2", "10.2.0.1", "::1", "169.254.169.254"):
        with pytest.raises(status.ImageError):
            check_ip(ipaddress.ip_address(address), allowed)


def test_host_allowlist_patterns() -> None:
    hosts = ("images.example.com", "*.cdn.example.net")
    assert host_allowed("anything.org", ())
    assert host_allowed("images.example.com", hosts)
    assert host_allowed("a.b.cdn.example.net", hosts)
    assert not host_allowed("cdn.example.net", hosts)  # the wildcard covers subdomains only
    assert not host_allowed("evilcdn.example.net", hosts)
    assert not host_allowed("images.example.com.evil.org", hosts)


def test_host_normalisation() -> None:
    assert normalise_host("Images.Example.COM.") == "images.example.com"
    assert normalise_host("bücher.example") == "xn--bcher-kva.example"
    for bad in ("%31%32%37.0.0.1", "exa mple.com", "a/b"):
        with pytest.raises(status.ImageError) as info:
            normalise_host(bad)
        assert info.value.status == status.BAD_URI


def _resolver(answers: dict[str, list[str]]):  # noqa: ANN202 - tiny test stub
    calls: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        return answers[host]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


def test_every_resolved_address_is_checked() -> None:
    resolver = _resolver({"mixed.test": ["93.184.215.14", "10.0.0.5"], "public.test": ["93.184.215.14"]})
    with pytest.raises(status.ImageError) as info:
        resolve_destination("mixed.test", 80, (), (), resolver)
    assert info.value.status == status.BLOCKED_DESTINATION
    pinned = resolve_destination("public.test", 80, (), (), resolver)
    assert pinned == ipaddress.ip_address("93.184.215.14")


@pytest.mark.parametrize("host", ["metadata.google.internal", "metadata.goog", "instance-data"])
def test_metadata_names_are_blocked_without_a_lookup(host: str) -> None:
    resolver = _resolver({})
    with pytest.raises(status.ImageError) as info:
        resolve_destination(host, 80, (), (), resolver)
    assert info.value.status == status.BLOCKED_DESTINATION
    assert resolver.calls == []


def test_literals_skip_dns_and_host_allowlist_comes_first() -> None:
    resolver = _resolver({})
    with pytest.raises(status.ImageError) as info:
        resolve_destination("0x7f.1", 80, (), (), resolver)
    assert info.value.status == status.BLOCKED_DESTINATION and resolver.calls == []
    with pytest.raises(status.ImageError) as info:
        resolve_destination("other.test", 80, ("images.test",), (), resolver)
    assert info.value.status == status.BLOCKED_HOST


def test_dns_failure_is_a_fetch_error() -> None:
    def failing(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    with pytest.raises(status.ImageError) as info:
        resolve_destination("nowhere.test", 80, (), (), failing)
    assert info.value.status == status.FETCH_ERROR


def _libc_numeric(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """What getaddrinfo makes of a numeric spelling without asking DNS (None: it would ask DNS)."""
    try:
        infos = socket.getaddrinfo(host, 80, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError):
        return None
    return ipaddress.ip_address(infos[0][4][0])


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "0x7f000001", "0177.0.0.1", "0177.0.0.01", "127.1",
                                  "127.0.1", "169.254.43518", "0xa9fea9fe", "0", "2130706434", "0x7f.2",
                                  "::ffff:127.0.0.1", "fd00:ec2::254"])
def test_parser_agrees_with_the_resolver_on_valid_spellings(host: str) -> None:
    assert parse_ip_literal(host) == _libc_numeric(host)


@pytest.mark.parametrize(("host", "verdict"), [("256.0.0.1", None), ("256.1.1.1", None), ("1.2.3.4.5", None),
                                               ("0x1g.1", None), ("09.1.1.1", None), ("1..1", None),
                                               ("10.0.0.1.", "10.0.0.1")])
def test_parser_is_why_malformed_numbers_never_reach_dns(host: str, verdict: str | None) -> None:
    # getaddrinfo takes these for names and would send them to DNS (fetch_error, or whatever a
    # resolver answers); the parser settles them first: bad_uri (None here), or the address.
    assert _libc_numeric(host) is None
    if verdict is not None:
        assert parse_ip_literal(host) == ipaddress.ip_address(verdict)
        return
    with pytest.raises(status.ImageError) as info:
        parse_ip_literal(host)
    assert info.value.status == status.BAD_URI
