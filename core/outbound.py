"""Requests to URLs that callers name (an evaluation's judge), refused where they would reach the server's own
network: else any caller could make a worker call its loopback interface, the private ranges or a cloud's
metadata endpoint (169.254.169.254) with headers of the caller's choosing (server-side request forgery).

Every address a host resolves to is checked, and the connection then goes to a checked address, never to the
name again: a DNS answer that changes between the check and the connection (rebinding) cannot switch it.
Hosts an operator allowed by name (host[:port]) skip the address check: this service's own address, a judge
on the local network.
"""

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
# IPv4 addresses reached from IPv6 through a NAT64 gateway (RFC 6052's well-known prefix)
NAT64 = ipaddress.ip_network("64:ff9b::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]


class RefusedURL(ValueError):
    """A URL the service does not connect to."""


@dataclass(frozen=True)
class Destination:
    """Where a request for a checked URL goes."""

    url: str  # the URL with its host replaced by the checked address (kept as named for an allowed host)
    host: str  # the Host header: host[:port] as the URL names it
    server_name: str  # the name TLS sends (SNI) and checks the server's certificate against


def resolve(host: str, port: int) -> list[str]:
    """Every address of host, as the system's resolver orders them."""
    try:
        return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    except socket.gaierror as e:
        raise RefusedURL(f"the host {host} does not resolve ({e.strerror})") from e


def host_and_port(entry: str) -> tuple[str, int | None]:
    """An allowed-host entry `host[:port]` (`[::1]:8000` for IPv6): the host lowercased, as URLs give it."""
    parts = urlsplit(f"//{entry}")
    if parts.netloc != entry or "@" in entry or not parts.hostname:
        raise ValueError(f"{entry!r} is not host[:port]")
    return parts.hostname, parts.port  # .port raises ValueError for a port that is not one


def destination(url: str, allowed_hosts: Iterable[str], resolve: Resolver = resolve) -> Destination:
    """Where to connect for url; RefusedURL if it is not a plain http(s) URL, or if its host is not allowed and
    resolves to an address that is not public."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise RefusedURL("only http and https URLs with a host are accepted")
    if "?" in url or "#" in url or "@" in parts.netloc:
        # paths are appended to the URL (a query or fragment would swallow them); credentials go in the API key
        raise RefusedURL("a URL with a query string, a fragment or user info (user:password@) is refused")
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    if _allowed(parts.hostname, port, allowed_hosts):  # trusted by name: reached as any client would
        return Destination(url, parts.netloc, parts.hostname)
    addresses = resolve(parts.hostname, port)
    for address in addresses:
        if not is_public(ipaddress.ip_address(address)):
            raise RefusedURL(f"{parts.hostname} resolves to {address}, which is not a public address (loopback, "
                             "private, link-local, ...), and the host is not among the server's allowed hosts")
    pinned = ipaddress.ip_address(addresses[0])
    netloc = f"[{pinned}]:{port}" if pinned.version == 6 else f"{pinned}:{port}"
    return Destination(urlunsplit(parts._replace(netloc=netloc)), parts.netloc, parts.hostname)


def _allowed(host: str, port: int, allowed_hosts: Iterable[str]) -> bool:
    """An entry without a port allows every port of its host."""
    return any(allowed == host and allowed_port in (None, port)
               for allowed, allowed_port in map(host_and_port, allowed_hosts))


def is_public(address: IPAddress) -> bool:
    """A unicast address of the public internet, and so is every IPv4 address it stands for."""
    return all(a.is_global and not a.is_multicast and not a.is_reserved for a in (address, *_embedded_ipv4(address)))


def _embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address reaches: mapped (::ffff:a.b.c.d), 6to4 (2002::/16) and NAT64."""
    if address.version == 4:
        return []
    embedded = [address.ipv4_mapped, address.sixtofour]
    if address in NAT64:
        embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF))
    return [a for a in embedded if a is not None]
