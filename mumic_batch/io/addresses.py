"""SSRF guard: which hosts and IP addresses an http(s) fetch may connect to.

Policy (docs/fetching.md): a destination is refused unless every address its name resolves to
is public. Numeric host spellings that browsers and libc accept (2130706433, 0x7f.1, 0177.0.0.1,
127.1) are normalised first, so they cannot slip past a textual check. The caller connects to
the address returned here (pinning), so a second DNS answer (rebinding) is never used.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Union

from mumic_batch.core.status import BAD_URI, BLOCKED_DESTINATION, BLOCKED_HOST, FETCH_ERROR, ImageError

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Resolver = Callable[[str, int], list[str]]  # (host, port) -> addresses as strings

# Refused destinations, listed explicitly so the policy does not depend on the Python patch
# release's idea of `is_global`; the `is_*` checks in `denial_reason` are a second net.
DENY_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "0.0.0.0/8",  # "this network"; 0.0.0.0 reaches the local host on Linux
        "10.0.0.0/8",  # RFC 1918
        "100.64.0.0/10",  # CGNAT shared space (also Alibaba's metadata 100.100.100.200)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, including the 169.254.169.254 metadata service
        "172.16.0.0/12",  # RFC 1918
        "192.0.0.0/24",  # IETF protocol assignments (incl. Oracle metadata 192.0.0.192)
        "192.0.2.0/24",  # TEST-NET-1
        "192.168.0.0/16",  # RFC 1918
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # TEST-NET-2
        "203.0.113.0/24",  # TEST-NET-3
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, incl. broadcast
        "::/128",  # unspecified
        "::1/128",  # loopback
        "::/96",  # IPv4-compatible (deprecated), reaches IPv4 space
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments (Teredo, ORCHID, ...)
        "2001:db8::/32",  # documentation
        "fc00::/7",  # unique local, incl. AWS's metadata fd00:ec2::254
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
)

# Names that reach a metadata service without needing a private-looking address in the URL.
BLOCKED_HOSTNAMES = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "metadata.azure.internal",
        "instance-data",
        "instance-data.ec2.internal",
    }
)

_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDR strings to networks (host bits allowed, e.g. 127.0.0.1/8)."""
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def normalise_host(host: str) -> str:
    """Lower-case, IDNA-encoded host without a trailing dot; raises ImageError(BAD_URI)."""
    host = host.strip().rstrip(".").lower()
    if not host:
        raise ImageError(BAD_URI, "empty host")
    if ":" in host:  # IPv6 literal (brackets already removed by the URI parser)
        return host
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError as err:
        raise ImageError(BAD_URI, f"host is not valid IDNA: {err}") from err
    if not set(host) <= _HOST_CHARS:
        raise ImageError(BAD_URI, f"host has characters outside [a-z0-9.-_]: {host!r}")
    return host


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address a numeric host denotes (any legacy IPv4 spelling), or None for a name."""
    if ":" in host:
        try:
            return ipaddress.ip_address(host)
        except ValueError as err:
            raise ImageError(BAD_URI, f"invalid IPv6 literal {host!r}") from err
    parts = host.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()
    if not _is_number(parts[-1]):
        return None
    # Same rule as the WHATWG URL parser: a host whose last label is a number is an IPv4 address.
    try:
        return ipaddress.IPv4Address(_ipv4_value(parts))
    except ValueError as err:
        raise ImageError(BAD_URI, f"invalid numeric host {host!r}") from err


def _is_number(label: str) -> bool:
    if label[:2] in ("0x", "0X"):
        return all(c in "0123456789abcdefABCDEF" for c in label[2:])
    return label.isdigit()


def _ipv4_value(parts: list[str]) -> int:
    if len(parts) > 4:
        raise ValueError("more than four parts")
    numbers = [_ipv4_number(p) for p in parts]
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise ValueError("part out of range")
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n * 256 ** (3 - i)
    return value


def _ipv4_number(part: str) -> int:
    if part == "":
        raise ValueError("empty part")
    if part[:2] in ("0x", "0X"):
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part[0] == "0":
        return int(part[1:], 8)
    return int(part, 10)


def canonical_ip(ip: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (::ffff:a.b.c.d) as the IPv4 address it really reaches."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def denial_reason(ip: IPAddress) -> str | None:
    """Why a connection to `ip` is refused, or None when it is a public address."""
    ip = canonical_ip(ip)
    embedded = _embedded_ipv4(ip)
    if embedded is not None:  # judged by the IPv4 address the gateway forwards to
        inner = denial_reason(embedded)
        return None if inner is None else f"{ip} embeds {inner}"
    for net in DENY_NETWORKS:
        if ip.version == net.version and ip in net:
            return f"{ip} is in denied range {net}"
    if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast:
        return f"{ip} is not a public address"
    if ip.is_reserved or ip.is_unspecified or not ip.is_global:
        return f"{ip} is not a public address"
    return None


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    # NAT64 and 6to4 gateways forward to the embedded IPv4 address, which may be internal.
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour if ip in _SIX_TO_FOUR else None


def check_ip(ip: IPAddress, allowed_networks: tuple[IPNetwork, ...]) -> IPAddress:
    """The canonical address when it may be contacted; raises ImageError(BLOCKED_DESTINATION)."""
    ip = canonical_ip(ip)
    if any(ip.version == net.version and ip in net for net in allowed_networks):
        return ip
    reason = denial_reason(ip)
    if reason is not None:
        raise ImageError(BLOCKED_DESTINATION, reason)
    return ip


def host_allowed(host: str, allowed_hosts: tuple[str, ...]) -> bool:
    """Empty list: any host. Entries are exact names or `*.example.com` (subdomains only)."""
    if not allowed_hosts:
        return True
    for entry in allowed_hosts:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and host != entry[2:]:
                return True
        elif host == entry:
            return True
    return False


def system_resolver(host: str, port: int) -> list[str]:
    """All TCP addresses of `host` from the system resolver (getaddrinfo)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


def resolve_destination(
    host: str, port: int, allowed_hosts: tuple[str, ...], allowed_networks: tuple[IPNetwork, ...],
    resolver: Resolver = system_resolver,
) -> IPAddress:
    """Check `host` (normalised) and every address it resolves to; return the one to connect to."""
    if not host_allowed(host, allowed_hosts):
        raise ImageError(BLOCKED_HOST, f"host {host} is not in fetch.allowed_hosts")
    if host in BLOCKED_HOSTNAMES:
        raise ImageError(BLOCKED_DESTINATION, f"host {host} is a metadata service name")
    literal = parse_ip_literal(host)
    if literal is not None:
        return check_ip(literal, allowed_networks)
    try:
        answers = resolver(host, port)
    except (OSError, UnicodeError) as err:
        raise ImageError(FETCH_ERROR, f"dns lookup of {host} failed: {err}") from err
    if not answers:
        raise ImageError(FETCH_ERROR, f"dns lookup of {host} returned no address")
    # Every answer must pass: otherwise a name with one public and one internal address could
    # be steered to the internal one by whichever the client happened to pick.
    checked = [check_ip(ipaddress.ip_address(a.split("%", 1)[0]), allowed_networks) for a in answers]
    return checked[0]
