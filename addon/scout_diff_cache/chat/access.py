"""Access control: the client key check, the rule against listening openly without one, header hygiene."""

from __future__ import annotations

import hmac
import ipaddress
import re
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


def host_name(host_header: str) -> str:
    """The name in a Host header, without port or brackets, lower case: "[::1]:8787" -> "::1"."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        host = name
    return host.rstrip(".")


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_allowed(host_header: str, allowed_names: Iterable[str]) -> bool:
    """Whether a request's Host may reach the proxy: an IP address, localhost, or a name allowed by setting.

    A web page that rebinds its own DNS name to 127.0.0.1 sends that name as its Host: refusing
    names nobody configured stops it.
    """
    name = host_name(host_header)
    if not name or is_ip_address(name) or name in LOCALHOST_NAMES or name.endswith(".localhost"):
        return True
    return name in {host_name(allowed) for allowed in allowed_names if allowed}


def open_listen_hosts(hosts: Iterable[str]) -> list[str]:
    """The listen hosts that are reachable from other machines ("" means every interface)."""
    return sorted({host or "0.0.0.0 (all interfaces)" for host in hosts if not is_loopback(host)})


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_FOLD = re.compile(rb"\r?\n[ \t]")


def malformed_header(fields: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Why a request's header block is unsafe to pass on, or None.

    A name must be an RFC 9110 token; a value must hold no control character but tab (no NUL, no
    bare CR or LF, no folded line): parsers disagree on those, and a model server that splits a
    value where the proxy did not would read headers the proxy never checked.
    """
    for name, value in fields:
        if not _TOKEN.fullmatch(name):
            return f"the header name {name[:40].decode('latin-1')!r} is not a token"
        if _FIELD_VALUE_CONTROL.search(value):
            kind = "is folded over lines (obsolete)" if _FOLD.search(value) else "holds a control character"
            return f"the value of the header {name.decode('latin-1')!r} {kind}"
    return None
