"""Fulfillment: how a buyer becomes a SaaS customer. The fulfillment URL handler (handler.py, a
WSGI app), served by `serve-registration` (server.py), the child `run` keeps (process.py), and the
customers' logic `customers add|list|remove` share with it (customers.py).

`from agent.fulfillment import make_app` is the seller's import for their own WSGI server.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.fulfillment.handler import Registrar, WsgiApp


def make_app(
    config: Any = None, *, redirect: str | None = None, registrar: Registrar | None = None
) -> WsgiApp:
    """The WSGI application. `config`: a loaded Config, a path, or None ($METERING_AGENT_CONFIG,
    else /etc/metering-agent/config.yaml); `redirect` overrides saas.registration.redirect.

    A top of its own, as a command is: it chooses the mode from the config (SaaS mode only).
    Imported here when called, so that importing this package's modules (the daemon imports
    process.py) loads neither the config loader nor the modes."""
    from agent.config import loader
    from agent.errors import ConfigError
    from agent.fulfillment.handler import app_for
    from agent.modes.choose import mode_for

    cfg = config
    if cfg is None or isinstance(cfg, (str, Path)):
        cfg = loader.load(loader.resolve_path(None if cfg is None else str(cfg)))
    saas = mode_for(cfg).customers("fulfillment", cfg.source)
    if redirect is None:
        if saas.registration is None:
            raise ConfigError(
                "saas.registration.redirect",
                "required: where a registered buyer goes (or pass redirect= to make_app)",
            )
        redirect = saas.registration.redirect
    return app_for(cfg, redirect, registrar)


__all__ = ["make_app"]
