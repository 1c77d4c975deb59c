"""A small app of the seller's fleet for the promql tests: `python -m tests.fleet_app PORT`.

`GET /work?customer=NAME` counts one request for that customer in `app_requests_total{customer}`
(prometheus_client) and answers 200 once it is counted; `GET /metrics` is the exposition that
Prometheus scrapes. Counters start from nothing at each start, as a restarted product's do.
"""

from __future__ import annotations

import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, generate_latest

REGISTRY = CollectorRegistry()
REQUESTS = Counter("app_requests", "requests served", ["customer"], registry=REGISTRY)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/metrics":
            body = generate_latest(REGISTRY)
        elif url.path == "/work":
            who = urllib.parse.parse_qs(url.query).get("customer", [""])[0]
            REQUESTS.labels(customer=who).inc()
            body = b"ok\n"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the test counts requests itself


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
