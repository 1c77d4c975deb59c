"""The fulfillment URL handler: a buyer's registration POST -> ResolveCustomer -> customer -> 302.

AWS Marketplace sends a buyer who subscribes to a SaaS product to the seller's fulfillment URL with
a form POST carrying `x-amzn-marketplace-token`. The token expires, so it is resolved at once
(ResolveCustomer), the customer stored in the ledger under its label (the account id; see
customers.py), and the browser sent on to `saas.registration.redirect` with the customer's ids
filled in. A bad or expired token answers 400 with a plain message for the buyer.

`make_app()` is a plain WSGI application, for a seller's own web server; `serve()` runs it on
waitress (server.py), which is what `run` does in a child process (`serve-registration`) when
`saas.registration` is set: the daemon itself never imports boto3 (see daemon/daemon.py).

The URL is on the internet, so the app keeps its own limits (limits.py): POSTs per client
(REMOTE_ADDR: the peer, or what a trusted proxy forwards, as the server sets it), ResolveCustomer
calls a second (its own rate, inside the account's budget that it shares with the sender:
sending/budget.py), each refused at once with Retry-After; and a token's answer is kept a while,
so the same token posted again makes no second call. `GET /healthz` is for a load balancer.

The token is never logged: not by the app, and not by the server's access log, which prints each
request's path without its query string.
"""

from __future__ import annotations

import contextlib
import html
import logging
import os
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import agent.fulfillment.limits as limits
from agent.clock import Clock
from agent.config.tables import check_redirect
from agent.errors import AgentError, NotAuthorized, Unavailable
from agent.ledger.customers import Customer
from agent.sending.budget import CallBudget

log = logging.getLogger(__name__)

FORM_FIELD = "x-amzn-marketplace-token"
MAX_BODY = 64 * 1024  # a registration POST is a few hundred bytes

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

BAD_TOKEN_PAGE = (
    "This registration link is not valid or has expired.\n"
    'Please go back to AWS Marketplace and choose "Set up your account" again.\n'
)
UNAVAILABLE_PAGE = "Registration is not available right now. Please try again in a minute.\n"
# Over a limit: the buyer's browser posts the token again by itself after Retry-After (a browser
# does not retry a 503 on its own, and the token is all the buyer has to register with).
BUSY_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Registration</title></head><body>
<p>Too many registrations right now. Trying again in {seconds} s&hellip;</p>
<form method="post" id="again">
<input type="hidden" name="x-amzn-marketplace-token" value="{token}">
<button type="submit">Try again now</button>
</form>
<script>setTimeout(function () {{ document.getElementById("again").submit(); }}, {ms});</script>
</body></html>
"""
HEALTHZ = "/healthz"
SLOT_WAIT = 1.0  # seconds a registration may wait for the account's next call slot
GET_PAGE = (
    "This is the product's AWS Marketplace fulfillment URL: it takes the registration POST that "
    "AWS Marketplace sends when a buyer sets up the product.\n"
)


def fill(redirect: str, customer: Customer) -> str:
    """The redirect with the customer's ids, each URL-quoted (an absent one is empty)."""
    values = {
        "customer_aws_account_id": customer.account_id,
        "license_arn": customer.license_arn,
        "agreement_id": customer.agreement_id,
        "customer": customer.label,
    }
    return redirect.format(**{k: urllib.parse.quote(v or "", safe="") for k, v in values.items()})


class OverBudget(Unavailable):
    """No ResolveCustomer call may start now: answered 503 with Retry-After."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("ResolveCustomer: over the handler's call budget")
        self.retry_after = retry_after


Answer = tuple[str, str, tuple[tuple[str, str], ...]]  # status, text, extra headers


class Limits:
    """The handler's limits (limits.py) on one monotonic clock: POSTs per client, its own
    ResolveCustomer rate inside the account's shared call budget, the answers of tokens seen,
    and one call at a time per token (a double click waits for the first answer)."""

    def __init__(self, clock: Clock, budget: CallBudget | None) -> None:
        self.clock, self.budget = clock, budget
        self.clients = limits.ClientRates(limits.CLIENT_PER_MINUTE / 60.0, limits.CLIENT_BURST)
        self.resolve_rate = limits.Rate(limits.RESOLVE_PER_SECOND, limits.RESOLVE_BURST)
        self.answers: limits.AnswerCache[Answer] = limits.AnswerCache()
        self._lock = threading.Lock()
        self._flights: dict[str, list[Any]] = {}

    def now(self) -> float:
        return self.clock.monotonic()

    def before_call(self) -> None:
        """Before each ResolveCustomer try: a slot of the handler's rate and of the account's
        budget, or OverBudget (no call)."""
        with self._lock:
            wait = self.resolve_rate.take(self.now())
        if wait > 0:
            raise OverBudget(wait)
        if self.budget is not None:
            slot = self.budget.reserve(max_wait=SLOT_WAIT)
            if slot is None:
                raise OverBudget(SLOT_WAIT)
            if slot > 0:
                self.clock.sleep(slot)

    @contextlib.contextmanager
    def one_call(self, key: str) -> Iterator[None]:
        """One registration of a token at a time; the others wait for its cached answer."""
        with self._lock:
            flight = self._flights.setdefault(key, [threading.Lock(), 0])
            flight[1] += 1
        try:
            with flight[0]:
                yield
        finally:
            with self._lock:
                flight[1] -= 1
                if flight[1] == 0:
                    del self._flights[key]


class Registrar:
    """Resolve a token and store its customer. The boto3 client is made on first use, and the
    ledger opened for each registration: a ledger the daemon moved aside (identity) is never
    written to, and nothing is held between the rare POSTs."""

    def __init__(self, cfg: Any, clock: Clock | None = None, client: Any = None) -> None:
        self.cfg = cfg
        self.clock = clock or Clock()
        self._client = client
        self._lock = threading.Lock()
        self.before_call: Any = None  # the handler's Limits.before_call, set by app_for

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                from agent.host.imds import resolve_region
                from agent.sending import client as metering

                region, _ = resolve_region(self.cfg.metering.region)
                self._client = metering.MeteringClient(
                    region, self.cfg.metering.endpoint_url, clock=self.clock
                )
            return self._client

    def register(self, token: str) -> Customer:
        from agent.fulfillment.customers import BuyerTaken, describe, from_resolved, store
        from agent.ledger import Ledger

        resolved = self.client().resolve_customer(token, self.before_call)
        now = self.clock.time()
        customer = from_resolved(resolved, None, now, self.cfg.product_code)
        ledger = Ledger(self.cfg.state_dir)
        try:
            stored = store(ledger, customer)
        except BuyerTaken as e:  # registered before (by hand): that label stays
            log.info("fulfillment: customer %s (%s) is registered already; nothing stored",
                     e.existing.label, describe(e.existing))  # fmt: skip
            return e.existing
        finally:
            ledger.close()
        log.info("fulfillment: %s", stored.line())
        return stored.customer


def app_for(cfg: Any, redirect: str, registrar: Registrar | None = None) -> WsgiApp:
    """The WSGI application for a SaaS config: a registration POST resolved, stored, and the
    buyer sent on to `redirect` (its fields checked now), within the handler's limits.
    `agent.fulfillment.make_app` is the seller's entry; `serve-registration` serves this."""
    target = check_redirect(redirect)
    registrar = registrar or Registrar(cfg)
    guard = Limits(registrar.clock, CallBudget.in_state_dir(cfg.state_dir, registrar.clock))
    registrar.before_call = guard.before_call

    def register(token: str) -> Answer:
        try:
            customer = registrar.register(token)
        except OverBudget as e:
            log.debug("fulfillment: over the ResolveCustomer budget; answered 503")
            return busy("503 Service Unavailable", token, e.retry_after)
        except NotAuthorized as e:
            from agent.sending.outcomes import TokenRefused

            if isinstance(e, TokenRefused):
                log.warning("fulfillment: %s; answered 400", _hide(str(e), token))
                return "400 Bad Request", BAD_TOKEN_PAGE, ()
            log.error("fulfillment: %s; answered 503", _hide(str(e), token))
            return "503 Service Unavailable", UNAVAILABLE_PAGE, ()
        except (Unavailable, AgentError) as e:
            log.error("fulfillment: registration failed: %s; answered 503", _hide(str(e), token))
            return "503 Service Unavailable", UNAVAILABLE_PAGE, ()
        except Exception as e:  # a bug or the ledger: one line, never a traceback with the token
            log.error("fulfillment: registration failed: %s: %s; answered 500",
                      type(e).__name__, _hide(str(e), token))  # fmt: skip
            return "500 Internal Server Error", UNAVAILABLE_PAGE, ()
        location = fill(target, customer)
        return "302 Found", "Registered; continue at " + location + "\n", (("Location", location),)

    def registration(environ: dict[str, Any]) -> Answer:
        token = _token(environ)
        if token is None:
            log.warning("fulfillment: a POST without %s; answered 400", FORM_FIELD)
            return "400 Bad Request", BAD_TOKEN_PAGE, ()
        key = limits.token_key(token)
        cached = guard.answers.get(key, guard.now())
        if cached is None:  # only a POST that would call counts against its client
            client = str(environ.get("REMOTE_ADDR") or "-")
            wait = guard.clients.take(client, guard.now())
            if wait > 0:
                log.debug("fulfillment: client %s over its POST limit; answered 429", client)
                return busy("429 Too Many Requests", token, wait)
        with guard.one_call(key):
            cached = guard.answers.get(key, guard.now())
            if cached is not None:
                log.info("fulfillment: a token seen before; answered %s from the cache",
                         cached[0].split()[0])  # fmt: skip
                return cached
            answer = register(token)
            if answer[0][:3] in ("302", "400"):  # the token's own answer, not the moment's
                guard.answers.put(key, answer, guard.now())
            return answer

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        def respond(status: str, text: str, *headers: tuple[str, str]) -> list[bytes]:
            body = text.encode()
            typed = any(name == "Content-Type" for name, _ in headers)
            start_response(
                status,
                [
                    *([] if typed else [("Content-Type", "text/plain; charset=utf-8")]),
                    ("Content-Length", str(len(body))),
                    ("Cache-Control", "no-store"),
                    *headers,
                ],
            )
            return [body]

        method = environ.get("REQUEST_METHOD", "GET")
        if method in ("GET", "HEAD") and environ.get("PATH_INFO") == HEALTHZ:
            status, text = _health(cfg.state_dir)
            return respond(status, text if method == "GET" else "")
        if method in ("GET", "HEAD"):
            return respond("200 OK", GET_PAGE if method == "GET" else "")
        if method != "POST":
            return respond("405 Method Not Allowed", "Only POST is accepted.\n", ("Allow", "POST"))
        status, text, headers = registration(environ)
        return respond(status, text, *headers)

    return app


def busy(status: str, token: str, wait: float) -> Answer:
    """Over a limit: Retry-After, and a page that posts the token again after it."""
    seconds = limits.retry_after(wait)
    page = BUSY_PAGE.format(seconds=seconds, ms=int(seconds) * 1000,
                            token=html.escape(token, quote=True))  # fmt: skip
    return status, page, (("Retry-After", seconds), ("Content-Type", "text/html; charset=utf-8"))


def _health(state_dir: Path) -> tuple[str, str]:
    """200 while a registration can be stored: the state directory is there and writable (the
    handler's own loop answering is the rest). It calls no AWS API: a load balancer polls it."""
    if os.path.isdir(state_dir) and os.access(state_dir, os.W_OK | os.X_OK):
        return "200 OK", "ok\n"
    return "503 Service Unavailable", f"the state directory {state_dir} is not writable\n"


def _token(environ: dict[str, Any]) -> str | None:
    """The form field from a urlencoded body (what AWS Marketplace posts)."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return None
    if not 0 < length <= MAX_BODY:
        return None
    body = environ["wsgi.input"].read(length).decode("utf-8", "replace")
    values = urllib.parse.parse_qs(body, max_num_fields=100).get(FORM_FIELD, [])
    token = values[0].strip() if values else ""
    return token or None


def _hide(text: str, token: str) -> str:
    return text.replace(token, "****") if token else text
