"""The HTTP API's server: uvicorn in a thread of the server process, on a socket bound
when it is made (a taken port fails the start at once), TLS from the same files as
gRPC (the client CA makes it mutual TLS). stop() sets uvicorn's should_exit: it stops
accepting, lets open responses finish (their requests have ended or been cancelled by
the engine's shutdown by then) and closes within the timeout.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time

import uvicorn

from loraplex.server.http.app import create_app


class HttpServer:
    def __init__(self, service, access, metrics, config):
        """`config`: the ServeConfig (host, http_port, TLS files, max_receive_message_bytes)."""
        app = create_app(service, access, metrics, max_body_bytes=config.max_receive_message_bytes)
        tls = {}
        if config.tls:
            tls = dict(ssl_certfile=str(config.tls_cert), ssl_keyfile=str(config.tls_key))
            if config.tls_client_ca is not None:
                tls.update(ssl_ca_certs=str(config.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        self._config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                      timeout_graceful_shutdown=5, timeout_keep_alive=5, **tls)  # fmt: skip
        self._server = uvicorn.Server(self._config)
        host = config.host.strip("[]")
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP
        # (an accepted socket inherits proto 0 from socket.socket's default), and without it a
        # keep-alive client waits out a delayed ACK (~40 ms) on every response
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, config.http_port))
        except OSError as e:
            self._socket.close()
            raise RuntimeError(f"could not bind HTTP to {config.host}:{config.http_port}: {e.strerror}") from None
        self.port = self._socket.getsockname()[1]
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> None:
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start (see the log)")
            time.sleep(0.01)

    def stop(self, timeout: float = 5.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout + 5.0)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(5.0)
        self._socket.close()
