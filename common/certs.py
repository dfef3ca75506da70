"""Key material for a deployment: a private CA, the SuperLink's TLS certificate, node keys.

Why our own CA: the SuperLink is reached by IP or an internal name, so a public CA rarely
fits; hospitals pin this CA with `flower-supernode --root-certificates`. Why ECDSA P-384
node keys in OpenSSH format: `flower-supernode --auth-supernode-private-key` loads the key
with `load_ssh_private_key` and accepts only EC keys, and `flwr supernode register` reads
the public key with `load_ssh_public_key` and accepts only NIST curves (checked in the
installed flwr 1.41 source).

Every private key is written mode 0600 to a temporary sibling and linked into place, so a
reader never sees a half-written or world-readable key, and an existing key is never
replaced unless the caller passes `force=True`.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import re
from pathlib import Path

from pydantic import BaseModel

from common.atomic_files import write_atomic
from common.errors import FedmergeError

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class CaFiles(BaseModel):
    cert: Path
    key: Path


class ServerFiles(BaseModel):
    cert: Path
    key: Path
    sans: list[str]


class NodeKeyFiles(BaseModel):
    private_key: Path
    public_key: Path
    fingerprint: str


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def parse_san(text: str):
    """`IP:1.2.3.4` or `DNS:name` (openssl's spelling) to an x509 GeneralName."""
    from cryptography import x509

    kind, _, value = text.partition(":")
    kind = kind.strip().upper()
    value = value.strip()
    if kind == "IP":
        try:
            return x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            raise FedmergeError(
                f"--san {text!r}: expected an IP address after 'IP:', e.g. IP:127.0.0.1"
            ) from None
    if kind == "DNS" and value and " " not in value:
        return x509.DNSName(value)
    raise FedmergeError(f"--san {text!r}: expected 'IP:ADDRESS' or 'DNS:NAME'")


def _check_free(paths: list[Path], force: bool) -> None:
    """Refuse before writing anything, so a refused command leaves the directory unchanged."""
    if force:
        return
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise FedmergeError(
            f"{existing[0]}: already exists; refusing to overwrite key material "
            "(pass --force to replace it)"
        )


def _write_atomic(path: Path, data: bytes, *, mode: int, force: bool) -> None:
    """With the final mode from the first byte; without --force never clobbers a file, even
    one that appears meanwhile."""
    try:
        write_atomic(path, data, mode=mode, overwrite=force)
    except FileExistsError:
        raise FedmergeError(
            f"{path}: already exists; refusing to overwrite key material "
            "(pass --force to replace it)"
        ) from None


def write_private(path: Path, data: bytes, *, force: bool = False) -> None:
    _write_atomic(path, data, mode=0o600, force=force)


def write_public(path: Path, data: bytes, *, force: bool = False) -> None:
    _write_atomic(path, data, mode=0o644, force=force)


def _pem_private(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def create_ca(
    out_dir: Path, *, common_name: str = "fedmerge deployment CA", days: int = 3650,
    force: bool = False,
) -> CaFiles:
    """A self-signed CA (ECDSA P-384) that may only sign leaf certificates."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out_dir = Path(out_dir)
    cert_path, key_path = out_dir / CA_CERT, out_dir / CA_KEY
    _check_free([key_path, cert_path], force)
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    write_private(key_path, _pem_private(key), force=force)
    write_public(cert_path, _pem_cert(cert), force=force)
    return CaFiles(cert=cert_path, key=key_path)


def load_ca(ca_dir: Path):
    """The CA certificate and key from `ca_dir`, with one clear error if they are unusable."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca_dir = Path(ca_dir)
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    for p in (cert_path, key_path):
        if not p.is_file():
            raise FedmergeError(f"{p}: not found; expected the CA made by `fedmerge certs ca`")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        raise FedmergeError(f"{cert_path}: expected a PEM X.509 certificate") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise FedmergeError(f"{key_path}: expected an unencrypted PEM private key") from None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise FedmergeError(f"{key_path}: this key does not belong to {cert_path}")
    return cert, key


def create_server_cert(
    ca_dir: Path, out_dir: Path, *, name: str = "superlink", sans: list[str],
    days: int = 825, force: bool = False,
) -> ServerFiles:
    """The SuperLink's TLS certificate, valid for every address in `sans`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not NODE_NAME_RE.match(name):
        raise FedmergeError(f"--name {name!r}: expected letters, digits, '_', '.' or '-'")
    if not sans:
        raise FedmergeError(
            "--san: at least one is required (the address hospitals dial, e.g. "
            "IP:127.0.0.1 or DNS:link.example.org); TLS checks it against the certificate"
        )
    general_names = [parse_san(s) for s in sans]
    ca_cert, ca_key = load_ca(ca_dir)
    out_dir = Path(out_dir)
    cert_path, key_path = out_dir / f"{name}.pem", out_dir / f"{name}.key"
    _check_free([key_path, cert_path], force)
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    cn = next((s.split(":", 1)[1] for s in sans if s.upper().startswith("DNS:")), name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(general_names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    write_private(key_path, _pem_private(key), force=force)
    write_public(cert_path, _pem_cert(cert), force=force)
    return ServerFiles(cert=cert_path, key=key_path, sans=list(sans))


def public_key_fingerprint(public_openssh: bytes) -> str:
    """OpenSSH-style `SHA256:...` fingerprint, so operators can compare keys by phone/email."""
    import base64
    import hashlib

    blob = base64.b64decode(public_openssh.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def create_node_keys(out_dir: Path, name: str, *, force: bool = False) -> NodeKeyFiles:
    """A hospital's SuperNode authentication key pair: `NAME.key` (0600) and `NAME.pub`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not NODE_NAME_RE.match(name):
        raise FedmergeError(
            f"node name {name!r}: expected 1-63 letters, digits, '_', '.' or '-'"
        )
    out_dir = Path(out_dir)
    priv_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    _check_free([priv_path, pub_path], force)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    public_line = public + f" fedmerge-node-{name}\n".encode()
    write_private(priv_path, private, force=force)
    write_public(pub_path, public_line, force=force)
    return NodeKeyFiles(
        private_key=priv_path, public_key=pub_path, fingerprint=public_key_fingerprint(public)
    )
