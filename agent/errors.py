"""The errors a user can cause, each with its sysexits code.

The CLI prints `str(error)` as one line and exits with `error.exit_code`; anything that is not an
AgentError is a bug and is allowed to show a traceback.
"""

from __future__ import annotations

EX_OK = 0
EX_SOFTWARE = 1
EX_UNAVAILABLE = 69
EX_NOPERM = 77
EX_CONFIG = 78


class AgentError(Exception):
    """An expected failure with a one-line message for the user."""

    exit_code = EX_SOFTWARE


class ConfigError(AgentError):
    """The config file or a plugin registration is wrong; `path` names the key."""

    exit_code = EX_CONFIG

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        self.errors: list[ConfigError] = [self]
        super().__init__(f"{path}: {message}" if path else message)

    @classmethod
    def of(cls, errors: list[ConfigError], where: str = "") -> ConfigError:
        """One error for several: each on its own line, so a seller fixes them in one pass."""
        if len(errors) == 1:
            return errors[0]
        lines = "".join(f"\n  {e}" for e in errors)
        error = cls(where, f"{len(errors)} errors:{lines}")
        error.errors = list(errors)
        return error


class UsageError(AgentError):
    """A command-line option that cannot be right here (as argparse's own usage errors)."""

    exit_code = 2


class NotAuthorized(AgentError):
    """The buyer's role may not call MeterUsage, or the instance is not entitled."""

    exit_code = EX_NOPERM


class Unavailable(AgentError):
    """The service, IMDS, credentials or a collector's source cannot be reached."""

    exit_code = EX_UNAVAILABLE


class LockHeld(AgentError):
    """Another `run` already holds the state directory."""

    exit_code = EX_SOFTWARE
