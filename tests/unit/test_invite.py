"""The invite token: every field round-trips; each way a pasted token goes wrong has its message."""

from __future__ import annotations

import base64
import hashlib
import re
import string
from collections.abc import Callable
from dataclasses import replace

import pytest

from exod.cluster import invite
from exod.cluster.invite import Invite
from exod.errors import ExoError

NOW = 1_750_000_000
FINGERPRINT = hashlib.sha256(b"a CA certificate").hexdigest()
SECRET = bytes(range(16))
ONE = Invite(
    addresses=("192.168.1.10",),
    port=52416,
    ca_fingerprint=FINGERPRINT,
    secret=SECRET,
    expires=NOW + 900,
)
MANY = Invite(
    addresses=("192.168.1.10", "10.0.0.2", "fd00::1234", "2001:db8::1", "169.254.7.1"),
    port=1,
    ca_fingerprint="f" * 64,
    secret=b"\xff" * 16,
    expires=2**32 - 1,
)

FROM = "the token that `exoctl cluster invite` printed on a member"
EMPTY = f"the invite token is empty: paste {FROM}"
NOT_A_TOKEN = f"this is not an exod invite token (one starts with exo1-): paste {FROM}"
DAMAGED = (
    f"the invite token is damaged (a character in it is wrong): copy it again exactly; it is {FROM}"
)
INCOMPLETE = re.compile(
    r"the invite token is incomplete \((\d+)( of (\d+))? characters\): it was cut short when "
    + re.escape(f"copied; copy the whole of {FROM}")
)
ALPHABET = string.ascii_letters + string.digits + "-_"


def error(token: str) -> str:
    with pytest.raises(ExoError) as e:
        invite.decode(token)
    assert e.value.reason == "invalid_argument"  # exoctl exits 64
    assert "\n" not in e.value.message
    return e.value.message


@pytest.mark.parametrize("inv", [ONE, MANY], ids=["one-address", "many"])
def test_every_field_round_trips(inv: Invite) -> None:
    token = invite.encode(inv)
    assert invite.decode(token) == inv


def test_a_token_is_one_short_line_of_url_safe_characters() -> None:
    token = invite.encode(ONE)
    assert token.startswith("exo1-")
    assert re.fullmatch(r"exo1-[A-Za-z0-9_-]+", token)
    assert len(token) == 92  # documented in exod/cluster/invite.py
    assert len(invite.encode(replace(ONE, addresses=("1.2.3.4",) * 2))) == 99
    assert len(invite.encode(replace(ONE, addresses=("1.2.3.4", "fd00::1")))) == 115


def test_addresses_come_back_in_canonical_form() -> None:
    inv = replace(ONE, addresses=("2001:DB8:0:0::1", "FD00:0000::0001"))
    assert invite.decode(invite.encode(inv)).addresses == ("2001:db8::1", "fd00::1")


def test_new_invite_has_a_fresh_secret_and_its_expiry() -> None:
    a = invite.new_invite(["192.168.1.10"], 52416, FINGERPRINT, 900, NOW + 0.7)
    b = invite.new_invite(["192.168.1.10"], 52416, FINGERPRINT, 900, NOW + 0.7)
    assert a.expires == NOW + 900
    assert len(a.secret) == invite.SECRET_BYTES == 16
    assert a.secret != b.secret
    assert invite.decode(invite.encode(a)) == a


def test_expired_from_the_second_of_its_expiry() -> None:
    assert not invite.expired(ONE, ONE.expires - 1)
    assert not invite.expired(ONE, ONE.expires - 0.001)
    assert invite.expired(ONE, ONE.expires)
    assert invite.expired(ONE, ONE.expires + 1)


def test_the_inviter_keeps_only_a_digest_of_the_secret() -> None:
    digest = invite.secret_digest(SECRET)
    assert digest == hashlib.sha256(SECRET).hexdigest()
    assert invite.secret_matches(SECRET, digest)
    assert not invite.secret_matches(SECRET[:-1] + b"\x00", digest)
    assert not invite.secret_matches(b"", digest)


# What people paste


@pytest.mark.parametrize(
    "wrap",
    [
        lambda t: f"  {t}\n",
        lambda t: f"\t{t}\r\n",
        lambda t: f"{t[:40]}\n{t[40:]}",  # a terminal wrapped the line
        lambda t: f"{t[:10]} {t[10:60]}\n  {t[60:]}",
    ],
)
def test_whitespace_anywhere_is_ignored(wrap: Callable[[str], str]) -> None:
    assert invite.decode(wrap(invite.encode(ONE))) == ONE


@pytest.mark.parametrize("token", ["", " ", "\n", " \t\r\n "])
def test_an_empty_token(token: str) -> None:
    assert error(token) == EMPTY


@pytest.mark.parametrize(
    "token",
    [
        "hello",
        "exo-abc",
        "exo1abc",
        "EXO1-abc",
        "xo1-abc",
        "exoctl cluster join exo1-abc",
        "https://example.com/exo1-abc",
        "exoa-abc",
    ],
)
def test_not_a_token(token: str) -> None:
    assert error(token) == NOT_A_TOKEN


def test_a_wrong_prefix_on_a_real_token() -> None:
    body = invite.encode(ONE).removeprefix("exo1-")
    for prefix in ("exo-", "ex1-", "exo1_", "exo1", "xo1-", "Exo1-", "eco1-"):
        assert error(prefix + body) == NOT_A_TOKEN, prefix


@pytest.mark.parametrize("version", ["0", "2", "10", "01"])
def test_an_unsupported_version_says_which(version: str) -> None:
    token = f"exo{version}-" + invite.encode(ONE).removeprefix("exo1-")
    assert error(token) == (
        f"this invite token is of format {version} (exo{version}-); this exod reads format 1 "
        "only: upgrade exod here, or make the invite on a member that runs the same exod "
        "version as this one"
    )


@pytest.mark.parametrize("inv", [ONE, MANY], ids=["one-address", "many"])
def test_cut_short_at_every_length(inv: Invite) -> None:
    token = invite.encode(inv)
    for n in range(1, len(token)):
        message = error(token[:n])
        match = INCOMPLETE.fullmatch(message)
        assert match is not None, (n, message)
        assert int(match.group(1)) == n
        if match.group(3) is not None:
            assert int(match.group(3)) == len(token), n
    assert error(token[:0]) == EMPTY


def test_the_number_of_characters_expected_is_said_once_it_is_known() -> None:
    token = invite.encode(ONE)
    assert error(token[:-1]) == (
        f"the invite token is incomplete (91 of 92 characters): it was cut short when copied; "
        f"copy the whole of {FROM}"
    )
    assert error("exo1") == (
        f"the invite token is incomplete (4 characters): it was cut short when copied; "
        f"copy the whole of {FROM}"
    )


@pytest.mark.parametrize("inv", [ONE, MANY], ids=["one-address", "many"])
def test_any_one_character_changed_is_damage(inv: Invite) -> None:
    token = invite.encode(inv)
    body_start = len("exo1-")
    for i in range(body_start, len(token)):
        for c in ALPHABET:
            if c == token[i]:
                continue
            assert error(token[:i] + c + token[i + 1 :]) == DAMAGED, (i, c)


@pytest.mark.parametrize("bad", ["!", "=", "+", "/", ".", "é", "\x00"])
def test_a_character_outside_url_safe_base64_is_damage(bad: str) -> None:
    token = invite.encode(ONE)
    assert error(token[:30] + bad + token[31:]) == DAMAGED
    assert error(token + bad) == DAMAGED


def test_characters_added_at_the_end_are_damage() -> None:
    token = invite.encode(ONE)
    for extra in ("A", "AA", "AAA", "AAAA", token[-8:]):
        assert error(token + extra) == DAMAGED, extra


def test_padding_is_damage() -> None:
    # encode never pads; a pasted '=' is not from it.
    assert error(invite.encode(ONE) + "=") == DAMAGED


def test_a_token_pasted_twice_is_damage() -> None:
    token = invite.encode(ONE)
    assert error(token + token) == DAMAGED


def _forge(payload: bytes) -> str:
    """A token whose length and checksum hold over a payload that encode never makes."""
    length = 2 + len(payload) + 4
    body = bytes([length, length ^ 0xFF]) + payload
    body += hashlib.sha256(body).digest()[:4]
    return "exo1-" + base64.urlsafe_b64encode(body).decode().rstrip("=")


def test_a_well_formed_token_with_an_impossible_payload_is_damage() -> None:
    head = bytes(32) + bytes(16) + (NOW).to_bytes(4, "big")
    assert invite.decode(_forge(head + (1).to_bytes(2, "big") + b"\x04" + bytes(4))).port == 1
    assert error(_forge(head + (0).to_bytes(2, "big") + b"\x04" + bytes(4))) == DAMAGED  # port 0
    assert error(_forge(head + (1).to_bytes(2, "big"))) == DAMAGED  # no address
    assert error(_forge(head + (1).to_bytes(2, "big") + b"\x05" + bytes(4))) == DAMAGED  # family
    assert error(_forge(head + (1).to_bytes(2, "big") + b"\x06" + bytes(4))) == DAMAGED  # short


# What exod must never make


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (replace(ONE, ca_fingerprint="F" * 64), "CA fingerprint must be 64 lowercase hex"),
        (replace(ONE, ca_fingerprint="f" * 63), "CA fingerprint must be 64 lowercase hex"),
        (replace(ONE, secret=bytes(15)), "the secret must be 16 bytes, not 15"),
        (replace(ONE, port=0), "port out of range: 0"),
        (replace(ONE, port=65536), "port out of range: 65536"),
        (replace(ONE, expires=0), "expiry out of range: 0"),
        (replace(ONE, expires=2**32), "expiry out of range"),
        (replace(ONE, addresses=()), "at least one address"),
        (replace(ONE, addresses=("mac.local",)), "does not appear to be an IPv4 or IPv6"),
        (replace(ONE, addresses=("fe80::1%en0",)), "an address with a zone cannot be shared"),
        (replace(ONE, addresses=("fd00::1",) * 12), "too many addresses for one token: 12"),
    ],
)
def test_encode_refuses_an_invite_exod_would_never_make(bad: Invite, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        invite.encode(bad)
