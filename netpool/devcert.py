"""Self-signed development certificates (``netpool cert``), made with ``cryptography``.

For trying TLS locally in one command, never for production: the key is
written unencrypted and nobody vouches for the certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["make_self_signed", "write_dev_certificate", "subject_alt_names"]

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


def subject_alt_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    """DNS names and IP addresses (told apart by parsing) as a SAN extension."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_self_signed(hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 365) -> tuple[bytes, bytes]:
    """Return ``(certificate PEM, private key PEM)`` for the given host names and addresses."""
    if not hosts:
        raise ValueError("at least one host name or address is needed")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "netpool development certificate"),
    ])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(subject_alt_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_dev_certificate(out_dir: str, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 365, *,
                          force: bool = False) -> tuple[str, str]:
    """Write ``cert.pem`` and ``key.pem`` (mode 600) into ``out_dir``; return their paths.

    Existing files are kept (FileExistsError) unless ``force``: a key
    overwritten by a second run is a server that no longer matches its
    clients' pinned certificate.
    """
    cert_path = os.path.join(out_dir, "cert.pem")
    key_path = os.path.join(out_dir, "key.pem")
    existing = [p for p in (cert_path, key_path) if os.path.exists(p)]
    if existing and not force:
        raise FileExistsError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}")
    os.makedirs(out_dir, exist_ok=True)
    cert_pem, key_pem = make_self_signed(hosts, days)
    with open(cert_path, "wb") as fh:
        fh.write(cert_pem)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_pem)
    return cert_path, key_path
