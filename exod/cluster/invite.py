"""The invite token: one short line that a person copies from one machine to another.

`exo1-` then unpadded URL-safe base64 of a compact binary payload (v1):

    [0] length L of the whole payload   [1] L XOR 0xFF (so a damaged length byte is seen as such)
    [2:34] the CA certificate's SHA-256  [34:50] the one-time secret
    [50:54] expiry, unix seconds (u32)   [54:56] the inviter's peer port (u16)
    then each address: 4 + 4 bytes (IPv4) or 6 + 16 bytes (IPv6)
    [L-4:L] the first 4 bytes of SHA-256 over everything before

The length tells a token cut short from one with a character changed (which the checksum
catches), so that each gets its own message. The checksum is not security: the joiner checks
the CA by its fingerprint and the inviter checks the secret; a token with one IPv4 address is
92 characters; each further IPv4 address adds about 7, each IPv6 address about 23.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
import secrets
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from exod.errors import ExoError

VERSION = 1
PREFIX = f"exo{VERSION}-"
SECRET_BYTES = 16  # 128 bits, for a secret that lives minutes and is used once

_HEAD = struct.Struct(">BB32s16sIH")  # length, its complement, fingerprint, secret, expiry, port
_CHECK = 4
_FAMILIES = {4: 4, 6: 16}  # family tag -> address bytes
_MAX_PAYLOAD = 255  # the length is one byte
_VERSIONED = re.compile(r"exo(\d+)-")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")

_FROM = "the token that `exoctl cluster invite` printed on a member"


@dataclass(frozen=True)
class Invite:
    addresses: tuple[str, ...]  # where the inviter's peer port listens, IPv4 or IPv6
    port: int
    ca_fingerprint: str  # pki.fingerprint of the cluster's CA certificate
    secret: bytes  # SECRET_BYTES; the inviter keeps only secret_digest(secret)
    expires: int  # unix seconds


def new_invite(
    addresses: Iterable[str], port: int, ca_fingerprint: str, ttl_s: int, now: float
) -> Invite:
    """An invite with a fresh secret that expires `ttl_s` from `now`."""
    return Invite(
        addresses=tuple(addresses),
        port=port,
        ca_fingerprint=ca_fingerprint,
        secret=secrets.token_bytes(SECRET_BYTES),
        expires=int(now) + ttl_s,
    )


def expired(invite: Invite, now: float) -> bool:
    return now >= invite.expires


def secret_digest(secret: bytes) -> str:
    """What the inviter stores of the secret it handed out: SHA-256, lowercase hex."""
    return hashlib.sha256(secret).hexdigest()


def secret_matches(secret: bytes, digest: str) -> bool:
    """Whether a joiner's secret is the one behind `digest`, in constant time."""
    return hmac.compare_digest(secret_digest(secret), digest)


def encode(invite: Invite) -> str:
    """The token. ValueError for an invite exod would never make (the caller's bug)."""
    if not _FINGERPRINT.fullmatch(invite.ca_fingerprint):
        raise ValueError(f"CA fingerprint must be 64 lowercase hex: {invite.ca_fingerprint!r}")
    if len(invite.secret) != SECRET_BYTES:
        raise ValueError(f"the secret must be {SECRET_BYTES} bytes, not {len(invite.secret)}")
    if not 0 < invite.port < 65536:
        raise ValueError(f"port out of range: {invite.port}")
    if not 0 < invite.expires < 2**32:
        raise ValueError(f"expiry out of range: {invite.expires}")
    if not invite.addresses:
        raise ValueError("an invite needs at least one address to reach the inviter at")
    body = b"".join(_pack_address(a) for a in invite.addresses)
    length = _HEAD.size + len(body) + _CHECK
    if length > _MAX_PAYLOAD:
        raise ValueError(f"too many addresses for one token: {len(invite.addresses)}")
    head = _HEAD.pack(
        length,
        length ^ 0xFF,
        bytes.fromhex(invite.ca_fingerprint),
        invite.secret,
        invite.expires,
        invite.port,
    )
    payload = head + body
    payload += hashlib.sha256(payload).digest()[:_CHECK]
    return PREFIX + base64.urlsafe_b64encode(payload).decode().rstrip("=")


def decode(text: str) -> Invite:
    """The invite in a token as pasted (whitespace anywhere is ignored: terminals wrap lines);
    ExoError("invalid_argument") saying what is wrong with it otherwise."""
    token = "".join(text.split())
    if not token:
        raise ExoError("invalid_argument", f"the invite token is empty: paste {_FROM}")
    match = _VERSIONED.match(token)
    if match is None:
        if PREFIX.startswith(token):
            raise _truncated(len(token), None)
        raise ExoError(
            "invalid_argument",
            f"this is not an exod invite token (one starts with {PREFIX}): paste {_FROM}",
        )
    if match.group(1) != str(VERSION):
        raise ExoError(
            "invalid_argument",
            f"this invite token is of format {match.group(1)} (exo{match.group(1)}-); this exod "
            f"reads format {VERSION} only: upgrade exod here, or make the invite on a member "
            "that runs the same exod version as this one",
        )
    chars = token[match.end() :]
    if not _BASE64URL.fullmatch(chars):
        raise _garbled()
    # A length of 4k+1 characters decodes to nothing whole at its end; drop that last one.
    raw = _b64decode(chars[: len(chars) - (len(chars) % 4 == 1)])
    if len(raw) < 2:
        raise _truncated(len(token), None)
    length, complement = raw[0], raw[1]
    if complement != length ^ 0xFF or length < _HEAD.size + _CHECK:
        raise _garbled()
    need = -(-length * 4 // 3)  # characters of unpadded base64 for `length` bytes
    if len(chars) < need:
        raise _truncated(len(token), len(PREFIX) + need)
    # More characters than the length says, or set bits past the last byte: not what encode
    # made (a clean cut was caught above).
    if len(chars) > need or base64.urlsafe_b64encode(raw).decode().rstrip("=") != chars:
        raise _garbled()
    payload, check = raw[:-_CHECK], raw[-_CHECK:]
    if not hmac.compare_digest(hashlib.sha256(payload).digest()[:_CHECK], check):
        raise _garbled()
    _, _, fingerprint, secret, expires, port = _HEAD.unpack_from(payload)
    addresses = _unpack_addresses(payload[_HEAD.size :])
    if addresses is None or not addresses or port == 0:
        raise _garbled()  # a checksum that holds over a payload encode never makes
    return Invite(
        addresses=addresses,
        port=port,
        ca_fingerprint=fingerprint.hex(),
        secret=secret,
        expires=expires,
    )


def _pack_address(text: str) -> bytes:
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        # A zone (fe80::1%en0) names an interface of the inviter, meaningless to the joiner.
        raise ValueError(f"an address with a zone cannot be shared: {text}")
    return bytes([address.version]) + address.packed


def _unpack_addresses(data: bytes) -> tuple[str, ...] | None:
    addresses: list[str] = []
    at = 0
    while at < len(data):
        size = _FAMILIES.get(data[at])
        if size is None or at + 1 + size > len(data):
            return None
        packed = data[at + 1 : at + 1 + size]
        address = ipaddress.IPv4Address(packed) if size == 4 else ipaddress.IPv6Address(packed)
        addresses.append(str(address))
        at += 1 + size
    return tuple(addresses)


def _b64decode(chars: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(chars + "=" * (-len(chars) % 4))
    except (binascii.Error, ValueError):
        return b""  # unreachable for base64url characters in a 4k, 4k+2 or 4k+3 length


def _truncated(have: int, need: int | None) -> ExoError:
    of = f" of {need}" if need is not None else ""
    return ExoError(
        "invalid_argument",
        f"the invite token is incomplete ({have}{of} characters): it was cut short when copied; "
        f"copy the whole of {_FROM}",
    )


def _garbled() -> ExoError:
    return ExoError(
        "invalid_argument",
        f"the invite token is damaged (a character in it is wrong): copy it again exactly; "
        f"it is {_FROM}",
    )
