"""Access control: the client key check and the rule against listening openly without one."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable

LOCALHOST_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def is_authorized(authorization: str | None, key: str) -> bool:
    """Constant-time comparison of the client's bearer token with the proxy key."""
    token = bearer_token(authorization)
    return token is not None and hmac.compare_digest(token.encode(), key.encode())


def is_loopback(host: str) -> bool:
    """True for loopback addresses and localhost; "" (all interfaces) and other names are not.

    An IPv4 address in IPv6 form (``::ffff:127.0.0.1``, as a dual-stack socket reports it) counts
    as the IPv4 address it holds.
    """
    name = host.strip().strip("[]").lower().partition("%")[0]
    if name in LOCALHOST_NAMES:
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def open_listen_hosts(hosts: Iterable[str]) -> list[str]:
    """The listen hosts that are reachable from other machines ("" means every interface)."""
    return sorted({host or "0.0.0.0 (all interfaces)" for host in hosts if not is_loopback(host)})
