"""Log formatting for journald and log shippers, and the redaction no log line escapes."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import IO

# AWS access key ids, secrets and session tokens in the shapes botocore and IMDS print them, and
# IMDSv2 session tokens: never in a log line, whatever a library decides to say.
_SECRETS = [
    (re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{12,}\b"), r"\1****"),
    (
        re.compile(
            r"(?i)((?:aws_)?(?:secret_access_key|secretaccesskey|session_token|"
            r"security[-_]token|x-aws-ec2-metadata-token|token)[\"']?\s*[:=]\s*[\"']?)"
            r"[^\s\"',}]+"
        ),
        r"\1****",
    ),
    (re.compile(r"(Signature=)[0-9a-f]+"), r"\1****"),
]


def redact(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class Redact(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(data, ensure_ascii=False)


# syslog priorities for journald's `<N>` line prefix (SyslogLevelPrefix=, on by default).
_PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}


def under_journald(stream: IO[str], env: Mapping[str, str] | None = None) -> bool:
    """True when `stream` is systemd's journal stream: $JOURNAL_STREAM names its device:inode.

    Checked against the stream itself, as systemd advises, so output redirected elsewhere by a
    child of the service keeps its timestamps."""
    env = os.environ if env is None else env
    expected = env.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


class JournalFormatter(logging.Formatter):
    """For journald: no timestamp of our own (the journal stamps each line), and the level as a
    `<N>` prefix journald turns into the entry's priority (`journalctl -p warning`)."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # journald makes each line an entry: every line of a multi-line message (a reload's list
        # of config errors, a traceback) keeps the event's priority.
        prefix = f"<{_PRIORITY.get(record.levelname, 6)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def text_formatter(stream: IO[str]) -> logging.Formatter:
    """The `text` format: timestamped on a terminal or in a file, not under journald."""
    if under_journald(stream):
        return JournalFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(message)s")
