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
    """True for loopback addresses and localhost; "" (all interfaces) and other names are not."""
    name = host.strip().strip("[]").lower()
    if name in LOCALHOST_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def open_listen_hosts(hosts: Iterable[str]) -> list[str]:
    """The listen hosts that are reachable from other machines ("" means every interface)."""
    return sorted({host or "0.0.0.0 (all interfaces)" for host in hosts if not is_loopback(host)})
