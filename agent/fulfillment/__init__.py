"""Fulfillment: how a buyer becomes a SaaS customer. The fulfillment URL handler (a WSGI app,
`make_app`, which `run` serves from a child process), and the customers' logic that `customers
add|list|remove` share with it.

`from agent.fulfillment import make_app` is the seller's import for their own WSGI server.
"""

from agent.fulfillment.handler import make_app

__all__ = ["make_app"]
