"""The cluster's X.509 material: what is signed verifies; everything else is refused, saying why."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from exod.cluster import pki
from exod.errors import ExoError

NOW = 1_750_000_000.0
YEAR = 365 * 86400
CLUSTER = "c-0123456789ab"
NODE = "n-0123456789ab"
OTHER_NODE = "n-ba9876543210"


@dataclass(frozen=True)
class Ca:
    key: bytes
    cert: bytes


@pytest.fixture(scope="module")
def ca() -> Ca:
    return Ca(*pki.new_ca(CLUSTER, 10 * YEAR, NOW))


@pytest.fixture(scope="module")
def other_ca() -> Ca:
    return Ca(*pki.new_ca("c-ffffffffffff", 10 * YEAR, NOW))


def node_cert(
    ca: Ca,
    node_id: str = NODE,
    lifetime_s: int = YEAR,
    now: float = NOW,
    addresses: tuple[str, ...] = (),
) -> bytes:
    key = pki.new_node_key()
    csr = pki.csr_for(key, node_id)
    return pki.sign_node(
        ca.key, ca.cert, csr, node_id, lifetime_s=lifetime_s, now=now, addresses=addresses
    )


def load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def refused(reason: str) -> pytest.RaisesExc[ExoError]:
    return pytest.raises(ExoError, check=lambda e: e.reason == reason)


def utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC)


# The CA


def test_the_ca_is_a_self_signed_p256_ca_named_by_the_cluster_id(ca: Ca) -> None:
    cert = load(ca.cert)
    assert cert.subject.rfc4514_string() == f"CN={CLUSTER}"
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert not usage.digital_signature
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    assert pki.key_matches(ca.key, ca.cert)
    assert cert.not_valid_before_utc == utc(NOW - pki.CLOCK_SLACK_S)
    assert cert.not_valid_after_utc == utc(NOW + 10 * YEAR)


def test_the_ca_key_is_unencrypted_pkcs8_pem(ca: Ca) -> None:
    assert ca.key.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert isinstance(serialization.load_pem_private_key(ca.key, None), ec.EllipticCurvePrivateKey)


@pytest.mark.parametrize("bad", ["", "C-0123", "c_0123", "c-0123-", "-c", "c 1", "c" * 64])
def test_a_malformed_cluster_id_is_refused(bad: str) -> None:
    with refused("invalid_argument"):
        pki.new_ca(bad, YEAR, NOW)


@pytest.mark.parametrize("lifetime", [0, -1])
def test_a_lifetime_that_is_not_positive_is_refused(lifetime: int) -> None:
    with refused("invalid_argument"):
        pki.new_ca(CLUSTER, lifetime, NOW)


# Node certificates


def test_a_node_certificate_names_its_node_and_verifies(ca: Ca) -> None:
    pem = node_cert(ca, addresses=("192.168.1.10", "fd00::1"))
    assert pki.verify_node_cert(ca.cert, pem, NOW) == NODE
    cert = load(pem)
    assert cert.subject.rfc4514_string() == f"CN={NODE}"
    assert cert.issuer == load(ca.cert).subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [NODE]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.168.1.10"),
        ipaddress.ip_address("fd00::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert cert.not_valid_before_utc == utc(NOW - pki.CLOCK_SLACK_S)
    assert cert.not_valid_after_utc == utc(NOW + YEAR)


def test_the_certificate_is_for_the_key_that_made_the_request(ca: Ca) -> None:
    key = pki.new_node_key()
    other_key = pki.new_node_key()
    pem = pki.sign_node(ca.key, ca.cert, pki.csr_for(key, NODE), NODE, lifetime_s=YEAR, now=NOW)
    assert pki.key_matches(key, pem)
    assert not pki.key_matches(other_key, pem)


def test_a_node_certificate_ends_no_later_than_its_ca() -> None:
    short = Ca(*pki.new_ca(CLUSTER, 1000, NOW))
    pem = node_cert(short, lifetime_s=YEAR)
    assert load(pem).not_valid_after_utc == load(short.cert).not_valid_after_utc


def test_a_request_for_another_node_id_is_refused(ca: Ca) -> None:
    csr = pki.csr_for(pki.new_node_key(), OTHER_NODE)
    with refused("permission_denied") as e:
        pki.sign_node(ca.key, ca.cert, csr, NODE, lifetime_s=YEAR, now=NOW)
    assert e.value.message == (
        f"the certificate request names {OTHER_NODE}, not {NODE}: "
        "a node may ask only for a certificate of its own id"
    )


def test_a_request_altered_on_the_way_is_refused(ca: Ca) -> None:
    csr = x509.load_pem_x509_csr(pki.csr_for(pki.new_node_key(), NODE))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature's S
    altered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with refused("permission_denied") as e:
        pki.sign_node(ca.key, ca.cert, altered, NODE, lifetime_s=YEAR, now=NOW)
    assert "is not signed by its own key" in e.value.message


def test_a_request_that_is_not_a_csr_is_refused(ca: Ca) -> None:
    with refused("invalid_argument") as e:
        pki.sign_node(ca.key, ca.cert, b"hello", NODE, lifetime_s=YEAR, now=NOW)
    assert e.value.message.startswith("the certificate request is not a PEM CSR")


def test_a_request_for_a_key_other_than_p256_is_refused(ca: Ca) -> None:
    for key in (ec.generate_private_key(ec.SECP384R1()), ed25519.Ed25519PrivateKey.generate()):
        algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NODE)]))
            .sign(key, algorithm)
        )
        with refused("invalid_argument") as e:
            pki.sign_node(
                ca.key,
                ca.cert,
                csr.public_bytes(serialization.Encoding.PEM),
                NODE,
                lifetime_s=YEAR,
                now=NOW,
            )
        assert "other than EC P-256" in e.value.message


def test_an_address_that_is_not_an_ip_is_refused(ca: Ca) -> None:
    with refused("invalid_argument") as e:
        node_cert(ca, addresses=("mac.local",))
    assert e.value.message == "'mac.local' is not an IP address; give IPv4 or IPv6"


@pytest.mark.parametrize("bad", ["N-1", "n_1", "n-1.local", ""])
def test_a_malformed_node_id_is_refused(ca: Ca, bad: str) -> None:
    with refused("invalid_argument"):
        pki.csr_for(pki.new_node_key(), bad)
    csr = pki.csr_for(pki.new_node_key(), NODE)
    with refused("invalid_argument"):
        pki.sign_node(ca.key, ca.cert, csr, bad, lifetime_s=YEAR, now=NOW)


def test_a_key_that_is_not_pem_is_refused(ca: Ca) -> None:
    with refused("invalid_argument") as e:
        pki.csr_for(b"not a key", NODE)
    assert e.value.message == (
        "the node key is not an unencrypted PEM private key: give the file that exod wrote"
    )


# Verifying a peer's certificate


def test_a_certificate_of_another_ca_is_refused(ca: Ca, other_ca: Ca) -> None:
    with refused("permission_denied") as e:
        pki.verify_node_cert(ca.cert, node_cert(other_ca), NOW)
    assert e.value.message == (
        f"the certificate of {NODE} is not issued by this cluster's CA ({CLUSTER}): "
        "that node belongs to another cluster; invite it with `exoctl cluster invite`"
    )


def test_a_certificate_of_another_ca_with_the_same_cluster_id_is_refused(ca: Ca) -> None:
    impostor = Ca(*pki.new_ca(CLUSTER, YEAR, NOW))
    with refused("permission_denied") as e:
        pki.verify_node_cert(ca.cert, node_cert(impostor), NOW)
    assert "is not issued by this cluster's CA" in e.value.message


def test_an_expired_certificate_is_refused_from_the_second_after_its_end(ca: Ca) -> None:
    pem = node_cert(ca, lifetime_s=3600)
    end = NOW + 3600
    assert pki.verify_node_cert(ca.cert, pem, end) == NODE
    with refused("permission_denied") as e:
        pki.verify_node_cert(ca.cert, pem, end + 1)
    assert e.value.message == (
        f"the certificate of {NODE} expired at 2025-06-15 16:06:40 UTC: "
        "that node renews it while it reaches the CA's node; else join it again"
    )


def test_a_certificate_not_valid_yet_is_refused(ca: Ca) -> None:
    pem = node_cert(ca, now=NOW + 86400)
    start = NOW + 86400 - pki.CLOCK_SLACK_S
    assert pki.verify_node_cert(ca.cert, pem, start) == NODE
    with refused("permission_denied") as e:
        pki.verify_node_cert(ca.cert, pem, start - 1)
    assert e.value.message == (
        f"the certificate of {NODE} is valid only from 2025-06-16 15:01:40 UTC: "
        "the clock of this machine or of that node is wrong; set both right"
    )


def test_a_certificate_signed_a_moment_ago_passes_a_clock_a_little_behind(ca: Ca) -> None:
    assert pki.verify_node_cert(ca.cert, node_cert(ca), NOW - 60) == NODE


def test_the_ca_certificate_presented_as_a_node_certificate_is_refused(ca: Ca) -> None:
    with refused("permission_denied") as e:
        pki.verify_node_cert(ca.cert, ca.cert, NOW)
    assert e.value.message == (
        f"{CLUSTER} presented a CA certificate, not a node's: a node connects with the "
        "certificate it got when it joined"
    )


def test_a_certificate_that_is_not_pem_is_refused(ca: Ca) -> None:
    with refused("permission_denied") as e:
        pki.verify_node_cert(ca.cert, b"-----BEGIN CERTIFICATE-----\nAAAA\n", NOW)
    assert e.value.message == (
        "the peer's certificate is not a PEM X.509 certificate: that peer is not an exod"
    )


def _by_hand(
    ca: Ca, cn: str, sans: list[x509.GeneralName], eku: list[x509.ObjectIdentifier]
) -> bytes:
    """A certificate the CA key signed but that `sign_node` would never make."""
    ca_key = serialization.load_pem_private_key(ca.key, None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(load(ca.cert).subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(utc(NOW - 60))
        .not_valid_after(utc(NOW + 3600))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_a_name_with_odd_characters_stays_on_one_line(ca: Ca, other_ca: Ca) -> None:
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    pem = _by_hand(other_ca, "n-1\nexod: all good", [x509.DNSName(NODE)], both)
    with refused("permission_denied") as e:
        pki.verify_node_cert(ca.cert, pem, NOW)
    assert e.value.message.startswith("the certificate of 'n-1\\nexod: all good' is not issued")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a\rb")]))
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with refused("permission_denied") as e:
        pki.sign_node(ca.key, ca.cert, csr, NODE, lifetime_s=YEAR, now=NOW)
    assert e.value.message.startswith("the certificate request names 'a\\rb', not n-")


def test_a_certificate_whose_name_and_san_disagree_is_refused(ca: Ca) -> None:
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    pem = _by_hand(ca, NODE, [x509.DNSName(OTHER_NODE)], both)
    with refused("permission_denied") as e:
        pki.verify_node_cert(ca.cert, pem, NOW)
    assert e.value.message == (
        f"the certificate of {NODE} names ['{OTHER_NODE}'] as its node: exod did not make it; "
        "join that node again"
    )


def test_a_certificate_without_client_auth_is_refused(ca: Ca) -> None:
    pem = _by_hand(ca, NODE, [x509.DNSName(NODE)], [ExtendedKeyUsageOID.SERVER_AUTH])
    with refused("permission_denied") as e:
        pki.verify_node_cert(ca.cert, pem, NOW)
    assert e.value.message.startswith(f"the certificate of {NODE} is refused (validation")
    assert e.value.message.endswith("): exod did not make it; join that node again")
    assert "\n" not in e.value.message


# Fingerprints and the CA a joiner is sent


def test_the_fingerprint_is_sha256_of_the_der_in_lowercase_hex(ca: Ca) -> None:
    expected = load(ca.cert).fingerprint(hashes.SHA256()).hex()
    assert pki.fingerprint(ca.cert) == expected
    assert pki.fingerprint(ca.cert) == pki.fingerprint(ca.cert)
    assert len(expected) == 64
    assert expected == expected.lower()
    assert pki.fingerprint(node_cert(ca)) != expected


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_the_fingerprint_is_what_openssl_shows_without_colons(ca: Ca) -> None:
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256"],
        input=ca.cert,
        capture_output=True,
        check=True,
    ).stdout.decode()
    # sha256 Fingerprint=AB:CD:...
    assert out.strip().split("=", 1)[1].replace(":", "").lower() == pki.fingerprint(ca.cert)


def test_the_ca_a_joiner_is_sent_is_checked_by_fingerprint(ca: Ca, other_ca: Ca) -> None:
    assert pki.check_ca(ca.cert, pki.fingerprint(ca.cert)) == CLUSTER
    assert pki.check_ca(ca.cert, pki.fingerprint(ca.cert).upper()) == CLUSTER
    with refused("permission_denied") as e:
        pki.check_ca(other_ca.cert, pki.fingerprint(ca.cert))
    assert e.value.message == (
        f"the inviter's CA certificate has fingerprint {pki.fingerprint(other_ca.cert)[:16]}..., "
        f"not the invite's {pki.fingerprint(ca.cert)[:16]}...: this is not the cluster that "
        "invited you; check the address, or ask for a new invite"
    )


def test_a_node_certificate_is_not_accepted_as_the_ca(ca: Ca) -> None:
    pem = node_cert(ca)
    with refused("permission_denied") as e:
        pki.check_ca(pem, pki.fingerprint(pem))
    assert e.value.message == "the inviter's CA certificate is not self-signed; ask again"


def test_cert_info(ca: Ca) -> None:
    pem = node_cert(ca, lifetime_s=3600)
    assert pki.cert_info(pem) == pki.CertInfo(
        name=NODE,
        not_before=NOW - pki.CLOCK_SLACK_S,
        not_after=NOW + 3600,
        fingerprint=pki.fingerprint(pem),
        is_ca=False,
    )
    assert pki.cert_info(ca.cert).is_ca
    assert pki.cert_info(ca.cert).name == CLUSTER


# Renewal and the expiry warning


def test_renewal_is_due_at_exactly_two_thirds_of_the_lifetime(ca: Ca) -> None:
    pem = node_cert(ca, lifetime_s=YEAR)
    info = pki.cert_info(pem)
    lifetime = info.not_after - info.not_before
    assert lifetime % 3 == 0  # so that two thirds is a whole second in this test
    due = info.not_before + lifetime * 2 // 3
    assert not pki.needs_renewal(pem, NOW)
    assert not pki.needs_renewal(pem, due - 1)
    assert not pki.needs_renewal(pem, due - 0.001)
    assert pki.needs_renewal(pem, due)
    assert pki.needs_renewal(pem, due + 1)
    assert pki.needs_renewal(pem, info.not_after + 1)


def test_renewal_boundary_when_two_thirds_is_not_a_whole_second(ca: Ca) -> None:
    pem = node_cert(ca, lifetime_s=1000)  # a window of 1300 s: two thirds is 866.67 s
    start = pki.cert_info(pem).not_before
    assert not pki.needs_renewal(pem, start + 866.66)
    assert pki.needs_renewal(pem, start + 866.67)


def test_expires_soon_from_30_days_before_the_end(ca: Ca) -> None:
    pem = node_cert(ca, lifetime_s=YEAR)
    end = pki.cert_info(pem).not_after
    assert pki.EXPIRY_WARNING_S == 30 * 86400
    assert not pki.expires_soon(pem, end - 30 * 86400 - 1)
    assert pki.expires_soon(pem, end - 30 * 86400)
    assert pki.expires_soon(pem, end + 1)
    assert not pki.expires_soon(pem, end - 3601, within_s=3600)
    assert pki.expires_soon(pem, end - 3600, within_s=3600)


# Data signed by the CA (membership entries)


def test_ca_signed_data_verifies_with_the_ca_certificate(ca: Ca, other_ca: Ca) -> None:
    data = b"member n-0123456789ab added"
    signature = pki.ca_sign(ca.key, data)
    assert pki.ca_verify(ca.cert, data, signature)
    assert not pki.ca_verify(ca.cert, data + b"!", signature)
    assert not pki.ca_verify(other_ca.cert, data, signature)
    assert not pki.ca_verify(ca.cert, data, signature[:-1] + bytes([signature[-1] ^ 1]))
    assert not pki.ca_verify(ca.cert, data, b"")
    assert not pki.ca_verify(ca.cert, data, b"garbage")


def test_a_ca_signature_is_not_a_plain_signature_over_the_data(ca: Ca) -> None:
    """The context prefix: what the CA signs for membership can never pass as anything else
    the CA key signs, such as the body of a certificate."""
    data = b"any bytes"
    signature = pki.ca_sign(ca.key, data)
    public_key = load(ca.cert).public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    with pytest.raises(InvalidSignature):
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
