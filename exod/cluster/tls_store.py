"""The cluster's TLS files in one directory, each written atomically; keys for exod's user only.

    ca.crt    the cluster CA's certificate (every member)
    ca.key    the CA's private key (only the node that made the cluster, or where it was moved)
    node.key  this node's private key (made here, never sent anywhere)
    node.crt  this node's certificate, signed by the CA

node.crt is written last and removed first: a node belongs to a cluster exactly when it is
there, so a join or leave cut short by a crash leaves a node that is in no cluster, never one
that is half in.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from exod.cluster import pki
from exod.errors import ExoError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
NODE_KEY = "node.key"
NODE_CERT = "node.crt"

_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644


class TlsStoreError(Exception):
    """A TLS file cannot be read or written; the message says which file, why, and what to do."""

    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        super().__init__(message)
        # A full disk is temporary (75); anything else needs a person (78 at start).
        self.disk_full = disk_full


@dataclass(frozen=True)
class Material:
    """What a member holds: the CA's certificate, its own key and certificate, maybe the CA key."""

    ca_cert: bytes
    node_key: bytes
    node_cert: bytes
    ca_key: bytes | None = None


def save(directory: Path, material: Material) -> None:
    """Write a member's files, node.crt last (see the module's docstring). A ca.key already there
    stays when `material` has none: a CA key is never removed by the way."""
    if material.ca_key is not None:
        write_pem(directory / CA_KEY, material.ca_key, private=True)
    write_pem(directory / NODE_KEY, material.node_key, private=True)
    write_pem(directory / CA_CERT, material.ca_cert, private=False)
    write_pem(directory / NODE_CERT, material.node_cert, private=False)


def load(directory: Path) -> Material | None:
    """This node's files, checked to belong together; None when it is in no cluster."""
    node_cert = read_pem(directory / NODE_CERT)
    if node_cert is None:
        return None
    ca_cert = read_pem(directory / CA_CERT)
    node_key = read_pem(directory / NODE_KEY)
    if ca_cert is None or node_key is None:
        missing = CA_CERT if ca_cert is None else NODE_KEY
        raise TlsStoreError(
            f"{directory / missing} is missing beside {NODE_CERT}: restore {directory} from a "
            "backup, or move it aside and join the cluster again"
        )
    ca_key = read_pem(directory / CA_KEY)
    for name, data in ((CA_CERT, ca_cert), (NODE_CERT, node_cert)):
        try:
            pki.cert_info(data)
        except ExoError:
            raise _damaged(directory, name) from None
    if not _matches(directory, NODE_KEY, node_key, node_cert):
        raise TlsStoreError(
            f"{directory / NODE_KEY} is not the key of {directory / NODE_CERT}: restore "
            f"{directory} from a backup, or move it aside and join the cluster again"
        )
    if ca_key is not None and not _matches(directory, CA_KEY, ca_key, ca_cert):
        raise TlsStoreError(
            f"{directory / CA_KEY} is not the key of {directory / CA_CERT}: put back the CA "
            "key of this cluster, or remove it if this node should not hold it"
        )
    return Material(ca_cert=ca_cert, node_key=node_key, node_cert=node_cert, ca_key=ca_key)


def _matches(directory: Path, name: str, key: bytes, cert: bytes) -> bool:
    try:
        return pki.key_matches(key, cert)
    except ExoError:  # the certificate was read above: it is the key that is not a key
        raise _damaged(directory, name) from None


def _damaged(directory: Path, name: str) -> TlsStoreError:
    return TlsStoreError(
        f"{directory / name} is damaged (it is not what exod wrote there): restore {directory} "
        "from a backup, or move it aside and join the cluster again"
    )


def clear(directory: Path, *, including_ca_key: bool) -> None:
    """Forget the cluster (leave, or removed): node.crt first, then the rest. The CA key goes
    only when the caller says so: without it no one can join the cluster any more."""
    names = (NODE_CERT, NODE_KEY, CA_CERT, CA_KEY) if including_ca_key else (NODE_CERT, NODE_KEY)
    for name in names:
        path = directory / name
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise _error("remove", path, e) from None
    _fsync_dir(directory)


def read_pem(path: Path) -> bytes | None:
    """A file's bytes, or None when it does not exist."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _error("read", path, e) from None


def write_pem(path: Path, data: bytes, *, private: bool) -> None:
    """Replace `path` with `data` atomically and durably (temp file, fsync, rename, fsync dir);
    a private file is mode 0600 from the moment it exists, never readable by others."""
    directory = path.parent
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _error("write", path, e) from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:  # mkstemp made it 0600 already
            os.fchmod(f.fileno(), _PRIVATE_MODE if private else _PUBLIC_MODE)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _error("write", path, e) from None
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable; some file systems cannot open or sync a directory, and the
    # rename is atomic there all the same.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _error(doing: str, path: Path, e: OSError) -> TlsStoreError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return TlsStoreError(
            f"cannot {doing} {path}: the disk is full; free some space", disk_full=True
        )
    return TlsStoreError(
        f"cannot {doing} {path}: {e.strerror or e}; give exod's user access to {path.parent}"
    )
