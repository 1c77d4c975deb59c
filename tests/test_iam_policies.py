"""The IAM policies shipped in packaging/iam/ grant what the docs say each mode's calls need,
nothing else: the docs' JSON blocks are the oracle (a permission added to one and not the other
fails here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def actions(policy: dict) -> set[str]:
    found: set[str] = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        action = statement["Action"]
        found.update([action] if isinstance(action, str) else action)
    return found


def documented(page: str) -> set[str]:
    """Every action named in a ```json block of docs/PAGE."""
    text = (ROOT / "docs" / page).read_text()
    found: set[str] = set()
    for block in re.findall(r"```json\n(.*?)```", text, re.S):
        found.update(re.findall(r'"((?:aws-marketplace|sqs):[A-Za-z]+)"', block))
    return found


def test_the_saas_policy_is_what_docs_saas_names() -> None:
    policy = json.loads((ROOT / "packaging" / "iam" / "saas-policy.json").read_text())
    assert (
        actions(policy)
        == documented("saas.md")
        == {
            "aws-marketplace:BatchMeterUsage",
            "aws-marketplace:ResolveCustomer",
            "sqs:ReceiveMessage",
            "sqs:DeleteMessage",
        }
    )
    assert "saas-policy.json" in (ROOT / "docs" / "saas.md").read_text()


def test_the_instance_policy_grants_only_metering_and_registration() -> None:
    policy = json.loads((ROOT / "packaging" / "iam" / "metering-policy.json").read_text())
    assert actions(policy) == {"aws-marketplace:MeterUsage", "aws-marketplace:RegisterUsage"}
