"""The HTTP API over TLS and mutual TLS, with the same flags as gRPC: a client that trusts
the CA gets completions; one without a certificate is refused when the server requires
client certificates; plaintext is not served on the TLS port."""

from __future__ import annotations

import http.client
import json
import ssl

import pytest

from pki import make_pki

BODY = json.dumps({"model": "tiny-llama", "prompt": "the cat", "max_tokens": 3, "temperature": 0})


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _complete(port: int, context: ssl.SSLContext | None) -> tuple[int, dict]:
    conn = (http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30) if context is not None
            else http.client.HTTPConnection("127.0.0.1", port, timeout=30))  # fmt: skip
    try:
        conn.request("POST", "/v1/completions", BODY, {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_tls(front_end, http_live, pki):
    server = front_end(tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    assert server.http_url.startswith("https://")
    trusting = ssl.create_default_context(cafile=str(pki["ca"]))
    status, body = _complete(server.http_port, trusting)
    plain_status, plain = _complete(http_live.server.http_port, None)  # the session's plaintext server
    assert status == 200 and body["choices"][0]["text"] == plain["choices"][0]["text"] and plain_status == 200
    with pytest.raises(ssl.SSLError):
        _complete(server.http_port, ssl.create_default_context())  # does not trust the test CA
    with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
        _complete(server.http_port, None)  # plaintext on the TLS port


def test_mutual_tls(front_end, pki):
    server = front_end(tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"])
    with_cert = ssl.create_default_context(cafile=str(pki["ca"]))
    with_cert.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    assert _complete(server.http_port, with_cert)[0] == 200
    rogue = ssl.create_default_context(cafile=str(pki["ca"]))
    rogue.load_cert_chain(str(pki["rogue_cert"]), str(pki["rogue_key"]))
    for context in (ssl.create_default_context(cafile=str(pki["ca"])), rogue):  # no certificate; another CA's
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            _complete(server.http_port, context)
