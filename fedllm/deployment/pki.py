"""Keys and certificates a federation needs: a private CA, the SuperLink's TLS certificate
(with the subjectAltName nodes connect to), and each SuperNode's authentication key pair
(EC P-384 in OpenSSH format, as Flower's node authentication expects).

Pure Python (the ``cryptography`` package Flower already depends on): no openssl or
ssh-keygen binaries needed on the machine.

Private keys are created with mode 0600 by the ``open`` call that creates them (never
written under the umask and tightened afterwards, which leaves a window where another local
user can read them), and an existing key is never overwritten unless asked: re-running a
script must not silently replace the CA every node already trusts.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PRIVATE_MODE = 0o600  # owner read/write, nothing for group or others
PUBLIC_MODE = 0o644
# EC P-384 for every TLS key: as strong as RSA-7680 (NIST SP 800-57) and generated in
# milliseconds; Flower's node keys are P-384 too.
_CURVE = ec.SECP384R1


@dataclass(frozen=True)
class TlsFiles:
    """Where :func:`make_tls` wrote the CA and SuperLink certificate."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def write_file(path: Path, data: bytes, mode: int, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` so that it has ``mode`` from the moment it exists.

    The bytes go to a fresh temporary file in the same folder, created with ``mode`` (and no
    more than that, whatever the umask) and exclusively (a planted file or symlink of the same
    name is never written through), then renamed over ``path`` in one step.

    Args:
        path: the file to create.
        data: its content.
        mode: its permission bits, e.g. :data:`PRIVATE_MODE`.
        overwrite: replace an existing ``path`` (default: refuse).

    Returns:
        ``path``.

    Raises:
        FileExistsError: when ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; remove it first (or pass --force) if you mean to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits we want (never added any)
        with os.fdopen(fd, "wb") as handle:
            fd = -1
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        temporary.unlink(missing_ok=True)
        raise
    return path


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    """CA: sign certificates and CRLs only. Server (ECDHE key exchange): sign handshakes only."""
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, name: x509.Name, now: datetime.datetime, days: int
) -> x509.Certificate:
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        # path_length=0: this CA signs end-entity certificates only, never another CA
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    hosts: list[str],
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime.datetime,
    days: int,
) -> x509.Certificate:
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        # serverAuth only: this certificate cannot be used to authenticate as a client
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def make_tls(out_dir: Path, hosts: list[str], days: int = 365, overwrite: bool = False) -> TlsFiles:
    """Create ``ca.crt``/``ca.key`` and ``server.crt``/``server.key`` (valid for ``hosts``).

    Args:
        out_dir: folder for the four files (created if missing).
        hosts: every DNS name or IP address clients use to reach the SuperLink (or the
            gateway in front of it); the first one is also the certificate's common name.
        days: validity of both certificates.
        overwrite: replace existing files (default: refuse, so a CA is never lost by accident).

    Returns:
        The paths written. Both keys have mode 0600.

    Raises:
        ValueError: when ``hosts`` is empty.
        FileExistsError: when one of the files exists and ``overwrite`` is false.
    """
    if not hosts:
        raise ValueError("give at least one host name or IP address for the server certificate")
    out_dir = Path(out_dir)
    files = TlsFiles(out_dir / "ca.crt", out_dir / "ca.key", out_dir / "server.crt", out_dir / "server.key")
    existing = [str(p) for p in (files.ca_cert, files.ca_key, files.server_cert, files.server_key) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} exist; remove them first (or pass --force) to replace the CA")
    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = ec.generate_private_key(_CURVE()), ec.generate_private_key(_CURVE())
    ca_cert = _ca_certificate(
        ca_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedllm federation CA")]), now, days
    )
    server_cert = _server_certificate(server_key, hosts, ca_cert, ca_key, now, days)
    write_file(files.ca_key, _key_pem(ca_key), PRIVATE_MODE, overwrite)
    write_file(files.server_key, _key_pem(server_key), PRIVATE_MODE, overwrite)
    write_file(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE, overwrite)
    write_file(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE, overwrite)
    return files


def make_node_keys(out_dir: Path, name: str, overwrite: bool = False) -> tuple[Path, Path]:
    """Create ``<name>`` (private, mode 0600, stays on the node) and ``<name>.pub`` (to register).

    Args:
        out_dir: folder for the two files (created if missing).
        name: the key's file name; also its comment in the public key.
        overwrite: replace an existing key pair (default: refuse).

    Returns:
        The private and the public key's paths.

    Raises:
        ValueError: when ``name`` is not a plain file name.
        FileExistsError: when the key exists and ``overwrite`` is false.
    """
    if not name or Path(name).name != name or name.startswith("."):
        raise ValueError(f"node key name {name!r} must be a plain file name (no folders, not hidden)")
    key = ec.generate_private_key(ec.SECP384R1())
    private = Path(out_dir) / name
    public = Path(out_dir) / f"{name}.pub"
    write_file(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
        PRIVATE_MODE,
        overwrite,
    )
    write_file(
        public,
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        + f" fedllm-{name}\n".encode(),
        PUBLIC_MODE,
        overwrite,
    )
    return private, public
