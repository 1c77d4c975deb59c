"""Log formatting for journald and log shippers, and the redaction no log line escapes."""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone

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
