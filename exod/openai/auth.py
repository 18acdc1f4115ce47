"""Who may use the HTTP API: the Host allowlist and the API key.

Even on loopback a web page can reach the API: a page on evil.example whose name is rebound to
127.0.0.1 (DNS rebinding) talks to exod as a same-origin site. Its requests still carry
`Host: evil.example`, so only names that mean this machine are answered. An IP address in Host
cannot be rebinding (the browser's origin is that address), so when exod listens on every
interface, any address is accepted and the key does the guarding.

The key, when configured, is required on every request, compared in constant time so that the
time of a refusal tells nothing about how much of a guess was right.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from exod.config import ConfigError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
MIN_KEY_CHARS = 16
MAX_KEY_BYTES = 4096


@dataclass(frozen=True)
class HostPolicy:
    names: frozenset[str]  # lower case; IPv6 addresses in brackets, as Host writes them
    port: int
    any_address: bool  # listening on every interface: any IP address may name this machine

    @classmethod
    def for_bind(cls, bind: str, port: int, extra: tuple[str, ...] = ()) -> HostPolicy:
        address = ipaddress.ip_address(bind)
        return cls(
            names=LOOPBACK_NAMES | {host_form(bind)} | {n.lower() for n in extra},
            port=port,
            any_address=address.is_unspecified,
        )

    def allows(self, header: str | None) -> bool:
        """Whether a request's Host header names this server (name, and port if given)."""
        if header is None:
            return False
        split = split_host(header)
        if split is None:
            return False
        host, port = split
        if port is not None and port != self.port:
            return False
        return host in self.names or (self.any_address and is_ip_literal(host))


def host_form(address: str) -> str:
    """An address as it appears in a Host header: IPv6 in brackets."""
    return f"[{address}]" if ":" in address else address


def split_host(header: str) -> tuple[str, int | None] | None:
    """`name[:port]` or `[v6][:port]`, lower-cased; None for anything else."""
    text = header.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text_or_empty = text.partition(":")
        port_text = port_text_or_empty if colon else None
    if not host:
        return None
    if port_text is None:
        return host, None
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        return None
    return host, int(port_text)


def is_ip_literal(host: str) -> bool:
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in text and text == host:
        return False  # an IPv6 address is only valid in brackets
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def key_matches(authorization: bytes | None, key: bytes) -> bool:
    """Whether an Authorization header is `Bearer <key>`, compared in constant time."""
    if authorization is None:
        return False
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(token.strip(), key)


def read_key(path: Path) -> bytes:
    """The API key in `path`: one line of printable ASCII, at least MIN_KEY_CHARS long.

    Raises ConfigError, so that a missing or weak key stops exod (exit 78) instead of leaving
    the API open.
    """
    try:
        st = os.stat(path)
        # Only a regular file: a named pipe there would block the daemon at start.
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"EXOD_API_KEY_FILE {path} is not a regular file")
        if st.st_size > MAX_KEY_BYTES:
            raise ConfigError(f"EXOD_API_KEY_FILE {path} is larger than {MAX_KEY_BYTES} bytes")
        key = path.read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"cannot read EXOD_API_KEY_FILE {path}: {e.strerror or e}") from None
    if len(key) < MIN_KEY_CHARS or not all(0x21 <= b <= 0x7E for b in key):
        raise ConfigError(
            f"the key in EXOD_API_KEY_FILE {path} must be one word of at least {MIN_KEY_CHARS} "
            "printable ASCII characters (for example: openssl rand -hex 32 > FILE)"
        )
    return key
