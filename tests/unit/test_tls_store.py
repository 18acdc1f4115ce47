"""The cluster's TLS files: written whole, keys private, mismatched files refused."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from exod.cluster import pki, tls_store
from exod.cluster.tls_store import Material, TlsStoreError

NOW = 1_750_000_000.0
NODE = "n-0123456789ab"


@pytest.fixture(scope="module")
def material() -> Material:
    ca_key, ca_cert = pki.new_ca("c-0123456789ab", 10 * 365 * 86400, NOW)
    key = pki.new_node_key()
    cert = pki.sign_node(
        ca_key, ca_cert, pki.csr_for(key, NODE), NODE, lifetime_s=365 * 86400, now=NOW
    )
    return Material(ca_cert=ca_cert, node_key=key, node_cert=cert, ca_key=ca_key)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_what_is_saved_loads_back(tmp_path: Path, material: Material) -> None:
    directory = tmp_path / "cluster"
    tls_store.save(directory, material)
    assert tls_store.load(directory) == material


def test_a_member_without_the_ca_key_loads_without_it(tmp_path: Path, material: Material) -> None:
    member = Material(material.ca_cert, material.node_key, material.node_cert)
    tls_store.save(tmp_path, member)
    assert not (tmp_path / tls_store.CA_KEY).exists()
    assert tls_store.load(tmp_path) == member


def test_keys_are_for_exods_user_only(tmp_path: Path, material: Material) -> None:
    directory = tmp_path / "cluster"
    tls_store.save(directory, material)
    assert mode(directory) == 0o700
    assert mode(directory / tls_store.CA_KEY) == 0o600
    assert mode(directory / tls_store.NODE_KEY) == 0o600
    assert mode(directory / tls_store.CA_CERT) == 0o644
    assert mode(directory / tls_store.NODE_CERT) == 0o644
    assert sorted(p.name for p in directory.iterdir()) == [
        "ca.crt",
        "ca.key",
        "node.crt",
        "node.key",
    ]


def test_a_key_replacing_a_readable_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    tls_store.write_pem(path, b"new", private=True)
    assert path.read_bytes() == b"new"
    assert mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]  # no temporary file left


def test_no_cluster_is_none(tmp_path: Path) -> None:
    assert tls_store.load(tmp_path / "absent") is None
    assert tls_store.load(tmp_path) is None


def test_a_join_cut_short_before_the_certificate_is_no_cluster(
    tmp_path: Path, material: Material
) -> None:
    tls_store.write_pem(tmp_path / tls_store.NODE_KEY, material.node_key, private=True)
    tls_store.write_pem(tmp_path / tls_store.CA_CERT, material.ca_cert, private=False)
    assert tls_store.load(tmp_path) is None


@pytest.mark.parametrize("missing", [tls_store.CA_CERT, tls_store.NODE_KEY])
def test_a_file_missing_beside_the_certificate_is_refused(
    tmp_path: Path, material: Material, missing: str
) -> None:
    tls_store.save(tmp_path, material)
    (tmp_path / missing).unlink()
    with pytest.raises(TlsStoreError) as e:
        tls_store.load(tmp_path)
    assert str(e.value) == (
        f"{tmp_path / missing} is missing beside node.crt: restore {tmp_path} from a backup, "
        "or move it aside and join the cluster again"
    )


def test_a_key_of_another_certificate_is_refused(tmp_path: Path, material: Material) -> None:
    tls_store.save(tmp_path, material)
    tls_store.write_pem(tmp_path / tls_store.NODE_KEY, pki.new_node_key(), private=True)
    with pytest.raises(TlsStoreError) as e:
        tls_store.load(tmp_path)
    assert str(e.value) == (
        f"{tmp_path / 'node.key'} is not the key of {tmp_path / 'node.crt'}: restore {tmp_path} "
        "from a backup, or move it aside and join the cluster again"
    )


def test_a_ca_key_of_another_ca_is_refused(tmp_path: Path, material: Material) -> None:
    tls_store.save(tmp_path, material)
    other_key, _ = pki.new_ca("c-ffffffffffff", 86400, NOW)
    tls_store.write_pem(tmp_path / tls_store.CA_KEY, other_key, private=True)
    with pytest.raises(TlsStoreError) as e:
        tls_store.load(tmp_path)
    assert str(e.value) == (
        f"{tmp_path / 'ca.key'} is not the key of {tmp_path / 'ca.crt'}: put back the CA key of "
        "this cluster, or remove it if this node should not hold it"
    )


@pytest.mark.parametrize("name", ["ca.crt", "node.crt", "node.key", "ca.key"])
def test_a_damaged_file_is_refused_by_name(tmp_path: Path, material: Material, name: str) -> None:
    tls_store.save(tmp_path, material)
    (tmp_path / name).write_bytes(b"\x00" * 100)
    with pytest.raises(TlsStoreError) as e:
        tls_store.load(tmp_path)
    assert str(e.value) == (
        f"{tmp_path / name} is damaged (it is not what exod wrote there): restore {tmp_path} "
        "from a backup, or move it aside and join the cluster again"
    )


def test_clear_forgets_the_cluster(tmp_path: Path, material: Material) -> None:
    tls_store.save(tmp_path, material)
    tls_store.clear(tmp_path, including_ca_key=True)
    assert list(tmp_path.iterdir()) == []
    assert tls_store.load(tmp_path) is None
    tls_store.clear(tmp_path, including_ca_key=True)  # twice is fine
    tls_store.clear(tmp_path / "absent", including_ca_key=True)


def test_clear_keeps_the_ca_key_unless_told(tmp_path: Path, material: Material) -> None:
    tls_store.save(tmp_path, material)
    tls_store.clear(tmp_path, including_ca_key=False)
    assert tls_store.load(tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "ca.key"]
    assert (tmp_path / "ca.key").read_bytes() == material.ca_key


def test_a_directory_that_cannot_be_made_says_why(tmp_path: Path, material: Material) -> None:
    (tmp_path / "cluster").write_text("a file where the directory goes")
    with pytest.raises(TlsStoreError) as e:
        tls_store.save(tmp_path / "cluster", material)
    assert str(e.value) == (
        f"cannot write {tmp_path / 'cluster' / 'ca.key'}: File exists; "
        f"give exod's user access to {tmp_path / 'cluster'}"
    )
    assert not e.value.disk_full


def test_a_path_that_is_a_directory_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "node.crt").mkdir()
    with pytest.raises(TlsStoreError) as e:
        tls_store.load(tmp_path)
    assert str(e.value) == (
        f"cannot read {tmp_path / 'node.crt'}: Is a directory; "
        f"give exod's user access to {tmp_path}"
    )


def test_a_full_disk_leaves_the_old_file_and_is_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "node.crt"
    path.write_bytes(b"old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(TlsStoreError) as e:
        tls_store.write_pem(path, b"new", private=False)
    assert e.value.disk_full
    assert str(e.value) == f"cannot write {path}: the disk is full; free some space"
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["node.crt"]
