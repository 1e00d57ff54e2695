"""A TLS front for a plain TCP server (a thread in the test), as stunnel would be.

The Redis-compatible servers installable from PyPI are built without TLS, so a
`rediss://` client is tested against a real Redis behind this relay: the TLS
handshake and certificate checks are the client's real ones.
"""
from __future__ import annotations

import socket
import ssl
import threading

from tests.support import SocketServer


class TLSRelay(SocketServer):
    def __init__(self, target_port: int, certfile: str, keyfile: str) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(certfile, keyfile)
        self.target_port = target_port
        super().__init__()

    def handle(self, raw: socket.socket) -> None:
        try:
            client = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()  # a client that refused our certificate
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
        _pipe(client, upstream)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.close()
            except OSError:
                pass
