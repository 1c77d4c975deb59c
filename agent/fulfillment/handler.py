"""The fulfillment URL handler: a buyer's registration POST -> ResolveCustomer -> customer -> 302.

AWS Marketplace sends a buyer who subscribes to a SaaS product to the seller's fulfillment URL with
a form POST carrying `x-amzn-marketplace-token`. The token expires, so it is resolved at once
(ResolveCustomer), the customer stored in the ledger under its label (the account id; see
customers.py), and the browser sent on to `saas.registration.redirect` with the customer's ids
filled in. A bad or expired token answers 400 with a plain message for the buyer.

`make_app()` is a plain WSGI application, for a seller's own web server (gunicorn, mod_wsgi);
`serve()` runs it on wsgiref, which is what `run` does in a child process (`serve-registration`)
when `saas.registration` is set: the daemon itself never imports boto3 (see daemon/daemon.py).

The token is never logged: not by the app, and not by the server's access log, which prints each
request's path without its query string (wsgiref's own prints the whole request line).
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

from agent.clock import Clock
from agent.config.tables import check_redirect
from agent.errors import AgentError, NotAuthorized, Unavailable
from agent.ledger.customers import Customer

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


class Registrar:
    """Resolve a token and store its customer. The boto3 client is made on first use, and the
    ledger opened for each registration: a ledger the daemon moved aside (identity) is never
    written to, and nothing is held between the rare POSTs."""

    def __init__(self, cfg: Any, clock: Clock | None = None, client: Any = None) -> None:
        self.cfg = cfg
        self.clock = clock or Clock()
        self._client = client
        self._lock = threading.Lock()

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

        resolved = self.client().resolve_customer(token)
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
    buyer sent on to `redirect` (its fields checked now). `agent.fulfillment.make_app` is the
    seller's entry; `serve-registration` serves this."""
    target = check_redirect(redirect)
    registrar = registrar or Registrar(cfg)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        def answer(status: str, text: str, *headers: tuple[str, str]) -> list[bytes]:
            body = text.encode()
            start_response(
                status,
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(body))),
                    ("Cache-Control", "no-store"),
                    *headers,
                ],
            )
            return [body]

        method = environ.get("REQUEST_METHOD", "GET")
        if method in ("GET", "HEAD"):
            return answer("200 OK", GET_PAGE if method == "GET" else "")
        if method != "POST":
            return answer("405 Method Not Allowed", "Only POST is accepted.\n", ("Allow", "POST"))
        token = _token(environ)
        if token is None:
            log.warning("fulfillment: a POST without %s; answered 400", FORM_FIELD)
            return answer("400 Bad Request", BAD_TOKEN_PAGE)
        try:
            customer = registrar.register(token)
        except NotAuthorized as e:
            from agent.sending.outcomes import TokenRefused

            if isinstance(e, TokenRefused):
                log.warning("fulfillment: %s; answered 400", _hide(str(e), token))
                return answer("400 Bad Request", BAD_TOKEN_PAGE)
            log.error("fulfillment: %s; answered 503", _hide(str(e), token))
            return answer("503 Service Unavailable", UNAVAILABLE_PAGE)
        except (Unavailable, AgentError) as e:
            log.error("fulfillment: registration failed: %s; answered 503", _hide(str(e), token))
            return answer("503 Service Unavailable", UNAVAILABLE_PAGE)
        except Exception as e:  # a bug or the ledger: one line, never a traceback with the token
            log.error("fulfillment: registration failed: %s: %s; answered 500",
                      type(e).__name__, _hide(str(e), token))  # fmt: skip
            return answer("500 Internal Server Error", UNAVAILABLE_PAGE)
        location = fill(target, customer)
        return answer("302 Found", "Registered; continue at " + location + "\n",
                      ("Location", location))  # fmt: skip

    return app


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
