"""`serve-registration`: the fulfillment handler on wsgiref, until SIGTERM/SIGINT or until the
`run` that started it is gone. Its access log prints each request's path and status only (a
query string or request line may carry a token)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import urllib.parse
from typing import Any

from agent.clock import Clock
from agent.config.model import Registration
from agent.errors import Unavailable
from agent.fulfillment.handler import Registrar, app_for

log = logging.getLogger(__name__)


def _server_classes() -> tuple[type, type]:
    """wsgiref's server and handler, quiet about tokens; made here, when serving, so that `run`
    (which imports this module for HandlerProcess) never loads http.server and wsgiref."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            exc = sys.exc_info()[1]
            log.warning("fulfillment: a connection from %s failed: %s", client_address[0],
                        type(exc).__name__)  # fmt: skip

    class Handler(WSGIRequestHandler):
        """Access lines without the query string or request line (either may carry a token)."""

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            path = urllib.parse.urlsplit(self.path).path
            log.info("fulfillment: %s %s %s from %s", self.command, path, code,
                     self.client_address[0])  # fmt: skip

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("fulfillment: a malformed request from %s", self.client_address[0])

    return Server, Handler


def listen_address(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def serve(cfg: Any, registration: Registration, clock: Clock | None = None) -> int:
    """Serve the handler on `registration.listen` (the config's saas.registration) until
    SIGTERM/SIGINT, or until the process that started it (`run`) is gone."""
    app = app_for(cfg, registration.redirect, Registrar(cfg, clock))
    listen = registration.listen
    host, port = listen_address(listen)
    from wsgiref.simple_server import make_server

    server_class, handler_class = _server_classes()
    try:
        server: Any = make_server(host, port, app, server_class=server_class,
                             handler_class=handler_class)  # fmt: skip
    except OSError as e:
        raise Unavailable(
            f"saas.registration.listen {listen}: cannot listen ({e.strerror}); choose a free "
            "port or stop what holds it"
        ) from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2})
    thread.start()
    log.info("fulfillment: listening on %s, redirecting to %s", listen,
             registration.redirect)  # fmt: skip
    parent = os.getppid()
    while not stop.wait(1.0):
        if os.getppid() != parent:  # `run` was killed (-9): no orphan keeps the port
            log.warning("fulfillment: the parent process %d is gone; stopping", parent)
            break
    server.shutdown()
    server.server_close()
    thread.join()
    return 0
