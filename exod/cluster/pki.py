"""The cluster's X.509 material: its CA, the nodes' keys and certificates, CA-signed data.

Everything here is a function over PEM bytes and plain values, built on `cryptography` (never
X.509 by hand), so that it is tested without files, clocks or sockets; `tls_store` keeps the
results on disk. Keys are EC P-256: what gRPC's TLS (BoringSSL) accepts on every platform.

Times are unix seconds (`time.time()`); X.509 keeps whole seconds, so a certificate's window
starts at the second `now` falls in, less `CLOCK_SLACK_S`.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from exod.errors import ExoError

# A certificate is valid from a few minutes before it is made: a peer whose clock is a little
# behind the signer's must not refuse a certificate that was signed a moment ago.
CLOCK_SLACK_S = 300
# When `expires_soon` turns into a warning in `exoctl status` (issue 11: 30 days before).
EXPIRY_WARNING_S = 30 * 86400
# Ids travel as DNS names in certificates (so that gRPC checks them as host names): one lowercase
# DNS label. exod makes them as `n-` (node) or `c-` (cluster) and 12 hex digits.
_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# Prefixed to every `ca_sign` message: no signed message can then also be the body of a
# certificate (DER, which starts with 0x30), so a signature over data that a peer chose can
# never be turned into a certificate of this CA.
_SIGN_CONTEXT = b"exod cluster ca signature v1\x00"
_CURVE = ec.SECP256R1
_OWN_FILE = "give the file that exod wrote"


@dataclass(frozen=True)
class CertInfo:
    """What `exoctl status` and renewal need to know about a certificate."""

    name: str  # its CN: the node id, or the cluster id for the CA
    not_before: float
    not_after: float
    fingerprint: str
    is_ca: bool


def new_ca(cluster_id: str, lifetime_s: int, now: float) -> tuple[bytes, bytes]:
    """A new cluster CA: (key PEM, self-signed certificate PEM) whose CN is `cluster_id`."""
    _check_id(cluster_id, "cluster id")
    key = ec.generate_private_key(_CURVE())
    name = _name(cluster_id)
    not_before, not_after = _window(now, lifetime_s)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # pathlen 0: the CA signs nodes only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def new_node_key() -> bytes:
    """A node's private key (PEM); it never leaves the node, only its CSR does."""
    return _key_pem(ec.generate_private_key(_CURVE()))


def csr_for(key_pem: bytes, node_id: str) -> bytes:
    """A certificate signing request (PEM) for `node_id`, signed by the node's own key."""
    _check_id(node_id, "node id")
    key = _load_key(key_pem, "the node key")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(node_id))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def sign_node(
    ca_key_pem: bytes,
    ca_cert_pem: bytes,
    csr_pem: bytes,
    node_id: str,
    *,
    lifetime_s: int,
    now: float,
    addresses: Iterable[str] = (),
) -> bytes:
    """The node certificate (PEM) for a CSR, after checking that the CSR is signed by its own key
    and names `node_id`. The node id is both CN and a DNS SAN (what gRPC matches a target name
    against), plus an IP SAN per address; it ends no later than the CA does."""
    _check_id(node_id, "node id")
    ca_key = _load_key(ca_key_pem, "the CA key")
    ca_cert = _load_cert(ca_cert_pem, "the CA certificate", "invalid_argument")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise ExoError(
            "invalid_argument",
            "the certificate request is not a PEM CSR: send the one `csr_for` made",
        ) from None
    if not csr.is_signature_valid:
        raise ExoError(
            "permission_denied",
            f"the certificate request for {node_id} is not signed by its own key: "
            "it was altered on the way; join again",
        )
    asked = _common_name(csr.subject)
    if asked != node_id:
        raise ExoError(
            "permission_denied",
            f"the certificate request names {_printable(asked)}, not {node_id}: "
            "a node may ask only for a certificate of its own id",
        )
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != (
        _CURVE.name
    ):
        raise ExoError(
            "invalid_argument",
            f"the certificate request for {node_id} is for a key other than EC P-256: "
            "make the key with `new_node_key`",
        )
    sans: list[x509.GeneralName] = [x509.DNSName(node_id)]
    for address in addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            raise ExoError(
                "invalid_argument", f"{address!r} is not an IP address; give IPv4 or IPv6"
            ) from None
    not_before, not_after = _window(now, lifetime_s)
    ca_public = ca_key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(node_id))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER, lowercase hex without colons (what invites carry)."""
    cert = _load_cert(cert_pem, "the certificate", "invalid_argument")
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def cert_info(cert_pem: bytes) -> CertInfo:
    cert = _load_cert(cert_pem, "the certificate", "invalid_argument")
    return CertInfo(
        name=_common_name(cert.subject),
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        fingerprint=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        is_ca=_is_ca(cert),
    )


def check_ca(ca_cert_pem: bytes, expected_fingerprint: str) -> str:
    """The cluster id of the CA certificate a joiner was sent, once its fingerprint is the one in
    the invite and it is a self-signed CA; a refusal otherwise."""
    cert = _load_cert(
        ca_cert_pem, "the inviter's CA certificate", "permission_denied", "ask for a new invite"
    )
    actual = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    if actual != expected_fingerprint.lower():
        raise ExoError(
            "permission_denied",
            f"the inviter's CA certificate has fingerprint {actual[:16]}..., not the invite's "
            f"{expected_fingerprint[:16]}...: this is not the cluster that invited you; "
            "check the address, or ask for a new invite",
        )
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        raise ExoError(
            "permission_denied", "the inviter's CA certificate is not self-signed; ask again"
        ) from None
    if not _is_ca(cert):
        raise ExoError(
            "permission_denied", "the inviter's CA certificate is not a CA; ask for a new invite"
        )
    return _common_name(cert.subject)


def verify_node_cert(ca_cert_pem: bytes, cert_pem: bytes, now: float) -> str:
    """The node id of a certificate this CA issued to a node and that is valid at `now`;
    ExoError("permission_denied") saying why not otherwise."""
    ca = _load_cert(
        ca_cert_pem, "this cluster's CA certificate", "internal", "restore ca.crt from a backup"
    )
    cert = _load_cert(
        cert_pem, "the peer's certificate", "permission_denied", "that peer is not an exod"
    )
    subject = _common_name(cert.subject)
    shown = _printable(subject)
    cluster = _common_name(ca.subject)
    if _is_ca(cert):
        raise ExoError(
            "permission_denied",
            f"{shown} presented a CA certificate, not a node's: a node connects with the "
            "certificate it got when it joined",
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ExoError(
            "permission_denied",
            f"the certificate of {shown} is not issued by this cluster's CA ({cluster}): "
            "that node belongs to another cluster; invite it with `exoctl cluster invite`",
        ) from None
    at = _utc(now)
    if at < cert.not_valid_before_utc:
        raise ExoError(
            "permission_denied",
            f"the certificate of {shown} is valid only from {_show(cert.not_valid_before_utc)}: "
            "the clock of this machine or of that node is wrong; set both right",
        )
    if at > cert.not_valid_after_utc:
        raise ExoError(
            "permission_denied",
            f"the certificate of {shown} expired at {_show(cert.not_valid_after_utc)}: "
            "that node renews it while it reaches the CA's node; else join it again",
        )
    verifier = PolicyBuilder().store(Store([ca])).time(at).build_client_verifier()
    try:
        verified = verifier.verify(cert, [])
    except VerificationError as e:
        raise ExoError(
            "permission_denied",
            f"the certificate of {shown} is refused ({' '.join(str(e).split())}): "
            "exod did not make it; join that node again",
        ) from None
    names = [n.value for n in verified.subjects or () if isinstance(n, x509.DNSName)]
    if names != [subject]:
        raise ExoError(
            "permission_denied",
            f"the certificate of {shown} names {names} as its node: exod did not make it; "
            "join that node again",
        )
    return subject


def needs_renewal(cert_pem: bytes, now: float) -> bool:
    """True once two thirds of the certificate's lifetime have passed."""
    info = cert_info(cert_pem)
    # Compared as 3·elapsed >= 2·lifetime: exact, no rounding at the boundary.
    return 3 * (now - info.not_before) >= 2 * (info.not_after - info.not_before)


def expires_soon(cert_pem: bytes, now: float, within_s: float = EXPIRY_WARNING_S) -> bool:
    return now >= cert_info(cert_pem).not_after - within_s


def key_matches(key_pem: bytes, cert_pem: bytes) -> bool:
    """Whether the certificate is for this private key (a node's files belong together)."""
    key = _load_key(key_pem, "the key")
    cert = _load_cert(cert_pem, "the certificate", "invalid_argument")
    return cert.public_key() == key.public_key()


def ca_sign(ca_key_pem: bytes, data: bytes) -> bytes:
    """The CA's signature over `data` (membership and revocation entries are CA-signed)."""
    key = _load_key(ca_key_pem, "the CA key")
    return key.sign(_SIGN_CONTEXT + data, ec.ECDSA(hashes.SHA256()))


def ca_verify(ca_cert_pem: bytes, data: bytes, signature: bytes) -> bool:
    cert = _load_cert(ca_cert_pem, "the CA certificate", "invalid_argument")
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return False
    try:
        public_key.verify(signature, _SIGN_CONTEXT + data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _check_id(value: str, what: str) -> None:
    if not _ID.fullmatch(value):
        raise ExoError(
            "invalid_argument",
            f"{value!r} is not a {what}: lowercase letters, digits and inner dashes, "
            "at most 63 (such as n-0123456789ab)",
        )


def _printable(name: str) -> str:
    """A name from a peer, safe inside a one-line message (a CN may hold any characters)."""
    if _ID.fullmatch(name):
        return name
    return repr(name[:70]) if name else "no name"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _common_name(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(values) != 1:
        return ""
    value = values[0].value
    return value if isinstance(value, str) else value.decode(errors="replace")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,  # a node signs TLS handshakes (ECDHE-ECDSA)
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _window(now: float, lifetime_s: int) -> tuple[datetime.datetime, datetime.datetime]:
    if lifetime_s <= 0:
        raise ExoError("invalid_argument", f"a certificate lifetime of {lifetime_s}s: give > 0")
    start = int(now)
    return _utc(start - CLOCK_SLACK_S), _utc(start + lifetime_s)


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC)


def _show(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(pem: bytes, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise ExoError(
            "invalid_argument", f"{what} is not an unencrypted PEM private key: {_OWN_FILE}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ExoError("invalid_argument", f"{what} is not an EC key: {_OWN_FILE}")
    return key


def _load_cert(pem: bytes, what: str, reason: str, fix: str = _OWN_FILE) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise ExoError(reason, f"{what} is not a PEM X.509 certificate: {fix}") from None
