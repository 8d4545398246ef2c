"""TLS credentials from PEM files, for both ends of a channel.

    server_credentials(cert, key)                 # TLS
    server_credentials(cert, key, client_ca=ca)   # mutual TLS: clients need a certificate
                                                  # signed by `ca`, or the handshake fails
    channel_credentials(ca=ca)                    # client: trust `ca` (None: system roots)
    channel_credentials(ca=ca, cert=c, key=k)     # client certificate for mutual TLS

It reads files and checks that they look like PEM; the TLS library checks the rest
(the handshake fails on a wrong key or an untrusted certificate). TlsError (a ValueError)
names the file. It imports only grpc, so the client can use it without the server's
dependencies.
"""

from __future__ import annotations

import os

import grpc

MAX_PEM_BYTES = 1 << 20  # a certificate chain is a few KiB


class TlsError(ValueError):
    """A certificate or key file is missing, unreadable or not PEM."""


def read_pem(path: str | os.PathLike, what: str) -> bytes:
    """The bytes of a PEM file; TlsError names `what` and the path when they are not usable."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as e:
        raise TlsError(f"{what} {os.fspath(path)!r} cannot be read: {e.strerror}") from None
    if len(data) > MAX_PEM_BYTES:
        raise TlsError(f"{what} {os.fspath(path)!r} is over {MAX_PEM_BYTES} bytes; not a PEM file")
    if b"-----BEGIN " not in data:
        raise TlsError(f"{what} {os.fspath(path)!r} is not PEM (no '-----BEGIN' line)")
    return data


def server_credentials(
    cert: str | os.PathLike, key: str | os.PathLike, client_ca: str | os.PathLike | None = None
) -> grpc.ServerCredentials:
    """TLS with the server's certificate chain and key; with `client_ca`, clients must
    present a certificate that `client_ca` signed."""
    pair = (read_pem(key, "TLS key"), read_pem(cert, "TLS certificate"))
    ca = None if client_ca is None else read_pem(client_ca, "TLS client CA")
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(
    ca: str | os.PathLike | None = None, cert: str | os.PathLike | None = None, key: str | os.PathLike | None = None
) -> grpc.ChannelCredentials:
    """A client's TLS: trust `ca` (None: the system's roots); `cert` and `key` together
    present a client certificate (mutual TLS)."""
    if (cert is None) != (key is None):
        raise TlsError("a client certificate needs both its certificate and its key")
    return grpc.ssl_channel_credentials(
        root_certificates=None if ca is None else read_pem(ca, "TLS CA"),
        private_key=None if key is None else read_pem(key, "TLS key"),
        certificate_chain=None if cert is None else read_pem(cert, "TLS certificate"),
    )
