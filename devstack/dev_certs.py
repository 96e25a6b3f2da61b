"""Development certificates: a private CA, a loopback server certificate and client ones.

`python -m devstack.dev_certs OUTDIR` writes ca.pem, ca.key, server.pem and server.key into
OUTDIR. The server certificate names DNS localhost and IP 127.0.0.1, 127.0.0.2 and ::1, so a
client that checks host names can reach the local mosquitto by any of them. Keys are EC P-256
and are written with mode 0600. Existing files are kept while they are valid, so running the command
again changes nothing. These files are for the demo and the tests only, never for a real
gateway, and .gitignore keeps them out of the repository.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 825

# A certificate that expires within this margin is replaced, so a test run never starts
# with a certificate that lapses halfway through.
RENEW_MARGIN = datetime.timedelta(days=30)

# Start validity an hour early, so a client whose clock runs slightly behind still accepts it.
BACKDATE = datetime.timedelta(hours=1)

SERVER_DNS_NAMES = ("localhost",)
# 127.0.0.2 lets a second emulated hub listen on the same port as the first, as a gateway
# that DPS moves to another hub keeps its uplink.port.
SERVER_IP_ADDRESSES = ("127.0.0.1", "127.0.0.2", "::1")


@dataclass(frozen=True)
class DevCerts:
    """Paths of the development CA and server certificate with their keys."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def dev_cert_paths(outdir: Path) -> DevCerts:
    return DevCerts(
        ca_cert=outdir / "ca.pem",
        ca_key=outdir / "ca.key",
        server_cert=outdir / "server.pem",
        server_key=outdir / "server.key",
    )


def ensure_dev_certs(outdir: Path) -> tuple[DevCerts, list[str]]:
    """Create the CA and the server certificate in outdir unless valid ones are there.

    Returns the paths and a list of what was created; the list is empty when every file was
    kept. A new CA always comes with a new server certificate, because the old one would no
    longer chain to it.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    paths = dev_cert_paths(outdir)
    created: list[str] = []

    ca = _load_valid_ca(paths)
    if ca is None:
        ca = _create_ca(paths)
        created.append(str(paths.ca_cert))

    ca_cert, ca_key = ca
    if str(paths.ca_cert) in created or not _server_is_valid(paths, ca_cert):
        _create_server(paths, ca_cert, ca_key)
        created.append(str(paths.server_cert))
    return paths, created


def make_client_cert(
    outdir: Path,
    ca_cert_file: Path,
    ca_key_file: Path,
    common_name: str,
    name: str | None = None,
    days: int = LEAF_DAYS,
) -> tuple[Path, Path]:
    """Issue a client certificate for TLS client authentication, signed by the given CA.

    Azure IoT Hub's CA-signed X.509 authentication requires the leaf's common name to equal
    the device id, so pass the device id as common_name. Writes <name>.pem and <name>.key
    (name defaults to common_name) and returns their paths. An existing pair is replaced.
    """
    ca_cert = x509.load_pem_x509_certificate(ca_cert_file.read_bytes())
    ca_key = _load_ec_key(ca_key_file)
    outdir.mkdir(parents=True, exist_ok=True)
    stem = name or common_name
    cert_path = outdir / f"{stem}.pem"
    key_path = outdir / f"{stem}.key"

    key = ec.generate_private_key(ec.SECP256R1())
    builder = _leaf_builder(common_name, key, ca_cert, days)
    builder = builder.add_extension(
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
    )
    cert = builder.sign(ca_key, hashes.SHA256())

    _write_key(key_path, key)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _load_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an EC private key")
    return key


def _load_valid_ca(
    paths: DevCerts,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """Load the CA and its key if both exist, match, and stay valid past the margin."""
    try:
        cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        key = _load_ec_key(paths.ca_key)
    except (OSError, ValueError):
        return None

    if cert.public_key() != key.public_key():
        return None
    if cert.not_valid_after_utc < _now() + RENEW_MARGIN:
        return None
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None
    if not constraints.ca:
        return None
    return cert, key


def _server_is_valid(paths: DevCerts, ca_cert: x509.Certificate) -> bool:
    """Check that the server pair exists, matches, chains to ca_cert and names loopback."""
    try:
        cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
        key = _load_ec_key(paths.server_key)
        cert.verify_directly_issued_by(ca_cert)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False

    if cert.public_key() != key.public_key():
        return False
    if cert.not_valid_after_utc < _now() + RENEW_MARGIN:
        return False
    dns_names = set(names.get_values_for_type(x509.DNSName))
    ip_addresses = {str(address) for address in names.get_values_for_type(x509.IPAddress)}
    return set(SERVER_DNS_NAMES) <= dns_names and set(SERVER_IP_ADDRESSES) <= ip_addresses


def _create_ca(paths: DevCerts) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "plcbridge development"),
        x509.NameAttribute(NameOID.COMMON_NAME, "plcbridge development CA"),
    ])
    now = _now()
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )

    _write_key(paths.ca_key, key)
    _write_file(paths.ca_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def _leaf_builder(
    common_name: str,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    days: int,
) -> x509.CertificateBuilder:
    """Start a leaf certificate with the extensions that strict verifiers require."""
    now = _now()
    ca_key_id = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id),
            critical=False,
        )
    )


def _create_server(
    paths: DevCerts, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in SERVER_DNS_NAMES]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IP_ADDRESSES]
    cert = (
        _leaf_builder("localhost", key, ca_cert, LEAF_DAYS)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    _write_key(paths.server_key, key)
    _write_file(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_file(path, pem, 0o600)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write data through a temporary file and a rename, so a reader never sees half a file.

    The temporary file is created with its final mode, so a key is never readable by others,
    not even for a moment.
    """
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # O_CREAT leaves an existing file's mode and applies the umask
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devstack.dev_certs",
        description="Create a development CA and a loopback server certificate, "
        "keeping valid existing ones.",
    )
    parser.add_argument(
        "outdir", type=Path, help="folder for ca.pem, ca.key, server.pem and server.key"
    )
    args = parser.parse_args(argv)

    try:
        _paths, created = ensure_dev_certs(args.outdir)
    except OSError as exc:
        print(f"dev_certs: cannot write to {args.outdir}: {exc}", file=sys.stderr)
        return 1

    if created:
        for path in created:
            print(f"dev_certs: created {path}")
    else:
        print(f"dev_certs: kept the valid certificates in {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
