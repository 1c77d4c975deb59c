"""Where the agent runs: the platform, IMDS, the instance identity, locks, file ownership, the
unit's sandbox, systemd (stop reason, sd_notify) and the log format."""
