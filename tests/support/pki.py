"""Test certificates made with `cryptography`: a CA, a server certificate for localhost
and 127.0.0.1, a client certificate it signed, and one signed by another CA."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject_key, name: str, issuer_key=None, issuer_name: str | None = None, ca: bool = False, server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name or name)]))
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key or subject_key, hashes.SHA256())


def _write(path: Path, key=None, cert=None) -> Path:
    from cryptography.hazmat.primitives import serialization

    if key is not None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    else:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def make_pki(d: Path) -> dict[str, Path]:
    """ca, server cert/key (localhost, 127.0.0.1), a client cert/key signed by ca, and a
    client cert/key signed by another CA (rogue), as PEM files in `d`."""
    ca_key, rogue_key = _key(), _key()
    ca = _cert(ca_key, "loraplex test CA", ca=True)
    server_key, client_key, stranger_key = _key(), _key(), _key()
    return {
        "ca": _write(d / "ca.pem", cert=ca),
        "server_cert": _write(d / "server.pem", cert=_cert(server_key, "localhost", ca_key, "loraplex test CA", server=True)),
        "server_key": _write(d / "server.key", key=server_key),
        "client_cert": _write(d / "client.pem", cert=_cert(client_key, "client", ca_key, "loraplex test CA")),
        "client_key": _write(d / "client.key", key=client_key),
        "rogue_ca": _write(d / "rogue-ca.pem", cert=_cert(rogue_key, "rogue CA", ca=True)),
        "rogue_cert": _write(d / "rogue.pem", cert=_cert(stranger_key, "client", rogue_key, "rogue CA")),
        "rogue_key": _write(d / "rogue.key", key=stranger_key),
    }
