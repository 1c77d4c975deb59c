"""`serve-registration`: the fulfillment handler on waitress, until SIGTERM/SIGINT or until the
`run` that started it is gone.

Why waitress (measured, docs/saas.md): it reads requests in one event loop and hands only whole
requests to a fixed pool of threads, so a slow client (slowloris, a slow body) holds a socket,
never a thread; 9 MiB PSS and 5 threads, where cheroot and gunicorn (which forks) each stopped
answering under 300 idle connections. Around it here: a deadline for a request's headers and
one for its body (waitress alone has only an idle timeout, which a byte every few seconds
defeats), a connection cap that makes room for a new connection by closing the one that has been
reading its request the longest (so idle attackers cannot lock buyers out), no `Server` header,
and an access log of method, path (never the query string: a token may be in it), status and
client.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterable
from typing import Any

from agent.clock import Clock
from agent.config.model import Registration
from agent.errors import Unavailable
from agent.fulfillment.handler import MAX_BODY, Registrar, StartResponse, WsgiApp, app_for

log = logging.getLogger(__name__)

THREADS = 4  # the worker pool: a registration is one ResolveCustomer call and a ledger write
HEADER_TIMEOUT = 10.0  # seconds from a request's first byte (or the connection) to its last header
BODY_TIMEOUT = 10.0  # seconds more for its body (a registration's body is a few hundred bytes)
IDLE_TIMEOUT = 15  # seconds a kept-alive connection may wait for its next request
MAX_HEADERS = 16 * 1024  # bytes of request line and headers; more is answered 431
FILES_BESIDES = 64  # open files the process needs beside its connections (ledger, boto3, logs)
SUMMARY_EVERY = 60  # seconds between two lines counting the limits' answers
QUIET = ("429", "503")  # the limits' answers: logged at debug (a flood would fill the journal)


def listen_address(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def access_logged(app: WsgiApp, every: float = SUMMARY_EVERY) -> WsgiApp:
    """Each request's method, path (without its query string), status and client; the answers
    of the limits at debug, and counted in one line a minute at most (a flood stays readable)."""
    quiet: Counter[str] = Counter()
    lock = threading.Lock()
    last = [-math.inf]  # the first answer of a limit is logged at once

    def summary(status: str) -> None:
        with lock:
            quiet[status] += 1
            now = time.monotonic()
            if now - last[0] < every:
                return
            counts, last[0] = dict(quiet), now
            quiet.clear()
        answered = ", ".join(f"{n} answered {code}" for code, n in sorted(counts.items()))
        log.warning("fulfillment: requests over the limits: %s (at most one such line a minute)",
                    answered)  # fmt: skip

    def logged(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        def start(status: str, headers: Any, *exc: Any) -> Any:
            path = urllib.parse.urlsplit(environ.get("PATH_INFO") or "/").path
            level = logging.DEBUG if status[:3] in QUIET else logging.INFO
            log.log(level, "fulfillment: %s %s %s from %s", environ.get("REQUEST_METHOD"), path,
                    status[:3], environ.get("REMOTE_ADDR"))  # fmt: skip
            if status[:3] in QUIET:
                summary(status[:3])
            return start_response(status, headers, *exc)

        return app(environ, start)

    return logged


def open_files_for(connections: int) -> int:
    """Raise this process's soft limit of open files for `connections` (up to the hard limit,
    the unit's LimitNOFILE); the connections it allows, logged when fewer."""
    import resource

    need = connections + FILES_BESIDES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < need:
        allowed = max(8, soft - FILES_BESIDES)
        log.warning("fulfillment: saas.registration.max_connections %d is more than the open "
                    "files allowed (%d): serving at most %d; raise LimitNOFILE in the unit",
                    connections, soft, allowed)  # fmt: skip
        return allowed
    return connections


def make_server(
    app: WsgiApp,
    registration: Registration,
    header_timeout: float = HEADER_TIMEOUT,
    body_timeout: float = BODY_TIMEOUT,
) -> Any:
    """A waitress server for `app` on `registration.listen` (not yet running: `.run()`)."""
    from waitress.channel import HTTPChannel
    from waitress.server import TcpWSGIServer

    # "Task queue depth is N" on each request queued behind the 4 threads: a flood's every
    # request. The queue is bounded by the connection cap; the access summary counts the flood.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)

    class Channel(HTTPChannel):
        """A connection that knows since when it has been reading its current request."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.reading_since: float | None = time.monotonic()
            super().__init__(*args, **kwargs)

        def received(self, data: bytes) -> bool:
            if self.reading_since is None:
                self.reading_since = time.monotonic()
            result: bool = super().received(data)
            if self.requests:  # a whole request: served next, nothing more to read for it
                self.reading_since = None
            return result

        def overdue(self, now: float) -> bool:
            if self.requests or self.reading_since is None:
                return False
            request = self.request
            limit = header_timeout
            if request is not None and request.headers_finished:
                limit += body_timeout
            return now - self.reading_since > limit

    class Server(TcpWSGIServer):
        channel_class = Channel
        cap = open_files_for(registration.max_connections)
        stopping = False
        told = -math.inf  # when `closed` was last logged

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.closed: Counter[str] = Counter()  # connections this server closed, by why
            super().__init__(*args, **kwargs)

        def run(self) -> None:
            """The event loop until `stop`; then every connection closed, in this thread."""
            try:
                while not self.stopping:
                    self.asyncore.loop(timeout=self.adj.asyncore_loop_timeout, map=self._map,
                                       use_poll=True, count=1)  # fmt: skip
            finally:
                self.task_dispatcher.shutdown(timeout=5)
                for dispatcher in list(self._map.values()):
                    dispatcher.close()

        def stop(self) -> None:
            """From another thread: end `run` (at once: the trigger wakes its poll)."""
            self.stopping = True
            self.pull_trigger()

        def maintenance(self, now: float) -> None:
            """waitress's idle timeout, and the header and body deadlines."""
            super().maintenance(now)
            mono = time.monotonic()
            for channel in list(self.active_channels.values()):
                if not channel.will_close and channel.overdue(mono):
                    channel.will_close = True
                    self.closed["past the read deadline"] += 1
            if self.closed and mono - self.told >= SUMMARY_EVERY:
                why = ", ".join(f"{n} {w}" for w, n in sorted(self.closed.items()))
                log.warning("fulfillment: connections closed: %s (at most one such line a "
                            "minute)", why)  # fmt: skip
                self.closed.clear()
                self.told = mono

        def handle_accept(self) -> None:
            try:
                accepted = self.accept()
            except OSError:
                return
            if accepted is None:
                return
            conn, addr = accepted
            if len(self.active_channels) >= self.cap and not self._make_room():
                conn.close()  # every connection is being served: the client may try again
                self.closed["at the cap, all busy"] += 1
                return
            self.channel_class(self, conn, addr, self.adj, map=self._map)

        def _make_room(self) -> bool:
            """At the cap: close the connection that has been reading its request longest."""
            reading = [
                c
                for c in self.active_channels.values()
                if not c.requests and c.reading_since is not None
            ]
            if not reading:
                return False
            oldest = min(reading, key=lambda c: c.reading_since)
            oldest.handle_close()
            self.closed["at the cap, to make room"] += 1
            return True

    host, port = listen_address(registration.listen)
    proxy: dict[str, Any] = {}
    if not registration.trusted_proxy and host.startswith(("127.", "::1", "localhost")):
        log.warning("fulfillment: listening on %s (loopback, so behind a proxy) without "
                    "saas.registration.trusted_proxy: every buyer shares the proxy's per-client "
                    "limit; set trusted_proxy: 127.0.0.1", registration.listen)  # fmt: skip
    if registration.trusted_proxy:  # REMOTE_ADDR is then the client that the proxy forwards
        proxy = dict(trusted_proxy=registration.trusted_proxy, trusted_proxy_count=1,
                     trusted_proxy_headers={"x-forwarded-for"})  # fmt: skip
    try:
        return Server(
            app,
            host=host,
            port=port,
            threads=THREADS,
            # waitress's own cap stops accepting (buyers would wait in the backlog): ours makes
            # room instead, so waitress's stays above it (its map also holds itself and a pipe)
            connection_limit=registration.max_connections + 8,
            backlog=1024,
            channel_timeout=IDLE_TIMEOUT,
            cleanup_interval=1,
            max_request_header_size=MAX_HEADERS,
            max_request_body_size=MAX_BODY,
            ident=None,  # no Server header, and waitress's error pages name no product
            clear_untrusted_proxy_headers=True,  # X-Forwarded-* of anyone else: dropped
            **proxy,
            expose_tracebacks=False,
            asyncore_use_poll=True,  # select() fails on descriptors above 1,023
        )
    except OSError as e:
        raise Unavailable(
            f"saas.registration.listen {registration.listen}: cannot listen ({e.strerror}); "
            "choose a free port or stop what holds it"
        ) from None


def serve(cfg: Any, registration: Registration, clock: Clock | None = None) -> int:
    """Serve the handler on `registration.listen` (the config's saas.registration) until
    SIGTERM/SIGINT, or until the process that started it (`run`) is gone."""
    app = access_logged(app_for(cfg, registration.redirect, Registrar(cfg, clock)))
    server = make_server(app, registration)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    log.info("fulfillment: listening on %s, redirecting to %s", registration.listen,
             registration.redirect)  # fmt: skip
    parent = os.getppid()
    while not stop.wait(1.0):
        if os.getppid() != parent:  # `run` was killed (-9): no orphan keeps the port
            log.warning("fulfillment: the parent process %d is gone; stopping", parent)
            break
    server.stop()
    thread.join(timeout=10)
    return 0
