"""Key material: formats Flower 1.41 accepts, file modes, and refusal to overwrite."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from common.cli import app
from common.errors import FedmergeError

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    assert _invoke("certs", "ca", "--out", str(d)).exit_code == 0
    r = _invoke(
        "certs", "server", "--ca-dir", str(d), "--out", str(d),
        "--san", "IP:127.0.0.1", "--san", "DNS:localhost",
    )
    assert r.exit_code == 0, r.output
    r = _invoke("certs", "node", "hospital-a", "--out", str(d / "keys"))
    assert r.exit_code == 0, r.output
    return d


def test_private_keys_are_0600_and_nothing_temporary_left(certs_dir):
    for p in (certs_dir / "ca.key", certs_dir / "superlink.key", certs_dir / "keys/hospital-a.key"):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    for p in (certs_dir / "ca.pem", certs_dir / "superlink.pem", certs_dir / "keys/hospital-a.pub"):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o644, p
    leftovers = [p.name for p in certs_dir.rglob(".*") if p.is_file()]
    assert leftovers == []


def test_server_certificate_is_signed_by_ca_with_sans(certs_dir):
    import ipaddress

    from cryptography import x509

    ca = x509.load_pem_x509_certificate((certs_dir / "ca.pem").read_bytes())
    srv = x509.load_pem_x509_certificate((certs_dir / "superlink.pem").read_bytes())
    srv.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert srv.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_node_keys_load_the_way_flower_loads_them(certs_dir):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    priv = serialization.load_ssh_private_key(
        (certs_dir / "keys/hospital-a.key").read_bytes(), None
    )
    assert isinstance(priv, ec.EllipticCurvePrivateKey)
    assert priv.curve.name == "secp384r1"
    # What `flwr supernode register` sends must be the key the SuperNode authenticates with.
    registered = try_load_public_key(certs_dir / "keys/hospital-a.pub")
    assert registered == public_key_to_bytes(priv.public_key())


def test_refuses_to_overwrite_unless_forced(certs_dir):
    key = certs_dir / "keys/hospital-a.key"
    before = key.read_bytes()
    r = _invoke("certs", "node", "hospital-a", "--out", str(certs_dir / "keys"))
    assert isinstance(r.exception, FedmergeError)
    assert "hospital-a.key" in str(r.exception) and "--force" in str(r.exception)
    assert key.read_bytes() == before
    r = _invoke("certs", "node", "hospital-a", "--out", str(certs_dir / "keys"), "--force")
    assert r.exit_code == 0, r.output
    assert key.read_bytes() != before
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600


def test_refused_ca_leaves_existing_files(certs_dir):
    ca = (certs_dir / "ca.pem").read_bytes()
    r = _invoke("certs", "ca", "--out", str(certs_dir))
    assert isinstance(r.exception, FedmergeError)
    assert (certs_dir / "ca.pem").read_bytes() == ca


def test_bad_san_is_one_clear_error_exit_2(tmp_path, certs_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "common.cli", "certs", "server", "--ca-dir", str(certs_dir),
         "--out", str(tmp_path), "--san", "IP:not-an-ip"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --san 'IP:not-an-ip'")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_server_cert_with_key_from_another_ca_is_refused(tmp_path, certs_dir):
    other = tmp_path / "other"
    assert _invoke("certs", "ca", "--out", str(other)).exit_code == 0
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed/ca.pem").write_bytes((certs_dir / "ca.pem").read_bytes())
    (tmp_path / "mixed/ca.key").write_bytes((other / "ca.key").read_bytes())
    r = _invoke("certs", "server", "--ca-dir", str(tmp_path / "mixed"), "--out",
                str(tmp_path / "o"), "--san", "IP:127.0.0.1")
    assert isinstance(r.exception, FedmergeError)
    assert "does not belong" in str(r.exception)
