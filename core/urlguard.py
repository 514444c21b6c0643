"""Webhook URL rules (SSRF guard): what may be called on its face, before any lookup."""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

# Cloud metadata services: refused even when allow-listed.
METADATA_ADDRESSES = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"),
                      ipaddress.ip_address("100.100.100.200")}


class UnsafeURL(ValueError):
    """The URL may not be called; the message says why."""


def literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP literal in any form a resolver would accept (dotted, decimal, octal, hex)."""
    text = host.strip("[]")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    try:
        # inet_aton-style forms: 2130706433, 0177.0.0.1, 0x7f.1
        packed = socket.inet_aton(text)
    except (OSError, ValueError):
        return None
    if not all(part and (part.isdigit() or part.lower().startswith("0x")) for part in text.split(".")):
        return None
    return ipaddress.IPv4Address(packed)


def is_metadata(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A cloud metadata address, also in its IPv4-mapped IPv6 form."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address in METADATA_ADDRESSES


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (
            address.teredo[1] if address.teredo else None)
        if embedded is not None:
            return is_public(embedded)
        if address in ipaddress.ip_network("64:ff9b::/96"):
            return is_public(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return address.is_global and not address.is_multicast


def check_url(url: str, allow_hosts: Iterable[str]) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL that passes the face rules; UnsafeURL otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURL(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UnsafeURL("the scheme must be https or http")
    if parts.username or parts.password:
        raise UnsafeURL("credentials in the URL are not allowed; use the webhook secret")
    host = (parts.hostname or "").lower()
    if not host:
        raise UnsafeURL("the URL has no host")
    allowed = {h.lower().strip("[]") for h in allow_hosts}
    address = literal_address(host)
    if address is not None:
        if is_metadata(address):
            raise UnsafeURL("cloud metadata addresses are never allowed")
        if not is_public(address) and str(address) not in allowed and host not in allowed:
            raise UnsafeURL(f"{address} is not a public address; the operator can allow it "
                            "with [webhooks] allow_hosts")
    elif host in ("localhost", "localhost.localdomain") or host.endswith(".localhost"):
        if host not in allowed:
            raise UnsafeURL("localhost is not allowed; the operator can allow it with "
                            "[webhooks] allow_hosts")
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)
