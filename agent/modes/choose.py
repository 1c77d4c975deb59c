"""The one place that reads the config's `mode:`: the commands that start (`run`, the `send`
child, `status`, `report`, `check`, `sample`, `trial`, the customers commands, `prepare-image`)
and the fulfillment handler's WSGI entry call it once and pass the Mode down."""

from __future__ import annotations

from agent.config.model import Config
from agent.modes.instance import InstanceMode
from agent.modes.mode import Mode


def mode_for(config: Config) -> Mode:
    """The config's billing mode: instance (the default) or saas."""
    if config.mode == "saas":
        # Imported here: an instance-mode daemon never loads SaaS sealing and BatchMeterUsage.
        from agent.modes.saas import SaasMode, settings

        return SaasMode(settings(config))
    return InstanceMode()
