"""Refusals of the seller's configuration and of the signature: the hour is held, never lost."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from agent.config import Config
from agent.ledger import Ledger
from agent.ledger.hours import SealedHour
from agent.modes.instance import Sender, seal_hours
from agent.sending import health
from agent.sending.outcomes import Outcome
from agent.windows import EXPIRY
from tests.billing import FakeClient, H, make_config
from tests.conftest import PRODUCT
from tests.fakes import FakeClock
from tests.test_sealing import fill

TWO_DIMS = """
  - name: egress_gb
    collector: {type: system, metric: cpu_count}
  - name: vcpus
    collector: {type: system, metric: cpu_count}
"""


def sealed(tmp_path: Path, product: str = PRODUCT) -> tuple[Config, Ledger, FakeClock]:
    cfg = make_config(tmp_path, dims=TWO_DIMS)
    ledger = Ledger(cfg.state_dir)
    for dim in ("egress_gb", "vcpus"):
        fill(ledger, dim, H, 60)
    clock = FakeClock(H + 3600)
    if product != PRODUCT:
        cfg = make_config(tmp_path, extra="", dims=TWO_DIMS)
        object.__setattr__(cfg, "product_code", product)
    seal_hours(ledger, cfg, clock.time(), offset=0)
    return cfg, ledger, clock


class DimensionUnknown(FakeClient):
    """The listing has no `egress_gb`: every call for it is refused."""

    def meter_usage(self, h: SealedHour) -> Outcome:
        out = super().meter_usage(h)
        if h.dimension == "egress_gb":
            return Outcome("held", code="InvalidUsageDimensionException", message="egress_gb")
        return out


@pytest.mark.parametrize(
    "code", ["InvalidSignatureException", "UnrecognizedClientException", "ExpiredTokenException"]
)
def test_signature_and_credential_answers_keep_the_hour(tmp_path: Path, code: str) -> None:
    cfg, ledger, clock = sealed(tmp_path)
    client = FakeClient(script=[Outcome("retry", code=code, message="try again")])
    report = Sender(ledger, cfg, client, clock).run()
    assert report.rejected == []
    assert [h.state for h in ledger.hours()] == ["sent", "sent"]
    first, again = client.calls[0], client.calls[1]
    assert first.client_token == again.client_token  # the identical request


def test_an_unknown_dimension_is_held_and_never_blocks_the_others(tmp_path: Path) -> None:
    cfg, ledger, clock = sealed(tmp_path)
    report = Sender(ledger, cfg, DimensionUnknown(), clock).run()
    states = {h.dimension: h.state for h in ledger.hours()}
    assert states == {"egress_gb": "pending", "vcpus": "sent"}
    assert [d for d, _, _ in report.held] == ["egress_gb"]
    data = json.loads((cfg.state_dir / "health.json").read_text())
    # vcpus was sent after egress_gb was refused: health still names the refused hour
    assert data["ok"] is False
    assert "egress_gb" in data["reason"] and "InvalidUsageDimensionException" in data["reason"]
    assert "2027-01-15T08:00Z" in data["reason"]
    # held until it expires, then expired (and still named)
    clock.t = H + 3540 + EXPIRY + 1
    Sender(ledger, cfg, DimensionUnknown(), clock).run()
    assert {h.dimension: h.state for h in ledger.hours()}["egress_gb"] == "expired"
    assert health.snapshot(ledger, clock.time())["ok"] is False
    # after a later success, and 24 h on, the loss is history: ok again
    ledger.note_success(H + 10 * 3600)
    assert health.snapshot(ledger, H + 10 * 3600)["ok"] is False
    assert health.snapshot(ledger, H + 26 * 3600)["ok"] is True


def test_a_rejected_hour_is_named_after_a_later_success(tmp_path: Path) -> None:
    cfg, ledger, clock = sealed(tmp_path)
    client = FakeClient(script=[Outcome("rejected", code="ValidationException", message="bad")])
    Sender(ledger, cfg, client, clock).run()
    assert {h.state for h in ledger.hours()} == {"rejected", "sent"}
    data = health.snapshot(ledger, clock.time())
    assert data["ok"] is False and data["failing_since"] is None
    assert "egress_gb rejected: ValidationException" in data["reason"]


def test_a_fixed_product_code_reissues_held_hours(tmp_path: Path) -> None:
    cfg, ledger, clock = sealed(tmp_path, product="wrongcode")
    refused = Outcome("held", code="InvalidProductCodeException", message="unknown product")
    Sender(ledger, cfg, FakeClient(script=[refused, refused]), clock).run()
    before = {h.dimension: h for h in ledger.hours()}
    assert {h.state for h in before.values()} == {"pending"}
    assert {h.product_code for h in before.values()} == {"wrongcode"}
    fixed = make_config(tmp_path, dims=TWO_DIMS)  # the config names PRODUCT again
    clock.advance(600)
    client = FakeClient()
    report = Sender(ledger, fixed, client, clock).run()
    assert sorted(report.reissued) == [("egress_gb", H), ("vcpus", H)]
    assert {c.product_code for c in client.calls} == {PRODUCT}
    after = {h.dimension: h for h in ledger.hours()}
    for dim, h in after.items():
        assert h.state == "sent" and h.reissues == 1
        assert h.client_token != before[dim].client_token
        assert (h.quantity, h.timestamp) == (before[dim].quantity, before[dim].timestamp)
    history = ledger.db.execute("SELECT reissued_from FROM hours").fetchall()
    assert all(json.loads(r[0])[0]["product_code"] == "wrongcode" for r in history)


def test_an_hour_that_may_have_been_accepted_is_never_reissued(tmp_path: Path) -> None:
    """Tried under the old code with an ambiguous answer (a timeout): it may be recorded, so it
    is resent identically, whatever the config says now."""
    cfg, ledger, clock = sealed(tmp_path, product="oldcode")
    timeout = Outcome("retry", code="ReadTimeoutError", message="timed out")
    Sender(ledger, cfg, FakeClient(script=[timeout] * 50), clock).run(deadline=clock.time() + 1)
    clock.advance(600)
    client = FakeClient()
    report = Sender(ledger, make_config(tmp_path, dims=TWO_DIMS), client, clock).run()
    tried = {(c.dimension, c.product_code) for c in client.calls}
    assert ("egress_gb", "oldcode") in tried  # the ambiguous one keeps its request
    assert ("vcpus", PRODUCT) in tried  # never tried: re-issued
    assert report.reissued == [("vcpus", H)]


def test_the_trigger_still_forbids_any_other_change(tmp_path: Path) -> None:
    cfg, ledger, clock = sealed(tmp_path)
    Sender(ledger, cfg, FakeClient(), clock).run()  # both sent
    with pytest.raises(sqlite3.IntegrityError):
        ledger.db.execute(
            "UPDATE hours SET product_code = 'x', client_token = 'y', reissues = reissues + 1"
        )
    assert not ledger.reissue("vcpus", H, product_code="x", client_token="y", now=clock.time())
    (tmp_path / "b").mkdir()
    ledger2 = Ledger(make_config(tmp_path / "b", dims=TWO_DIMS).state_dir)
    fill(ledger2, "vcpus", H, 3)
    seal_hours(ledger2, cfg, H + 3600, offset=0)
    ledger2.begin_attempt("vcpus", H, H + 3600)
    ledger2.schedule_retry("vcpus", H, error="ThrottlingException: slow", next_attempt=H + 3600)
    with pytest.raises(sqlite3.IntegrityError):  # tried, and not refused for its product code
        ledger2.db.execute("UPDATE hours SET product_code = 'x', client_token = 'y', "
                           "reissues = reissues + 1")  # fmt: skip
    with pytest.raises(sqlite3.IntegrityError):  # the quantity never changes
        ledger2.db.execute("UPDATE hours SET quantity = '99'")


class KilledMidRequest(FakeClient):
    """The service records the request, then the send child is killed before the answer is
    stored (stop's terminate after 5 s, the send timeout's kill)."""

    def meter_usage(self, h: SealedHour) -> Outcome:
        super().meter_usage(h)
        raise KeyboardInterrupt  # a BaseException, as a signal's would be: nothing is marked


def test_an_hour_whose_send_was_killed_mid_request_is_never_reissued(tmp_path: Path) -> None:
    cfg, ledger, clock = sealed(tmp_path, product="oldcode")
    killed = KilledMidRequest()
    with pytest.raises(KeyboardInterrupt):
        Sender(ledger, cfg, killed, clock).run()
    recorded = killed.calls[0]  # the service has this one
    left = {h.dimension: (h.attempts, h.refusals) for h in ledger.hours()}
    assert left == {recorded.dimension: (1, 0), "vcpus": (0, 0)}  # counted before it left
    clock.advance(600)
    client = FakeClient()
    report = Sender(ledger, make_config(tmp_path, dims=TWO_DIMS), client, clock).run()
    assert (recorded.dimension, H) not in report.reissued
    again = [c for c in client.calls if c.dimension == recorded.dimension]
    assert [(c.product_code, c.client_token) for c in again] == [
        (recorded.product_code, recorded.client_token)
    ]  # resent identically: the service answers with the record it has, no second bill
    h = {x.dimension: x for x in ledger.hours()}[recorded.dimension]
    assert (h.state, h.reissues, h.attempts) == ("sent", 0, 2)


def test_attempts_count_the_requests_that_left(tmp_path: Path) -> None:
    cfg, ledger, clock = sealed(tmp_path, product="oldcode")
    refused = Outcome("held", code="InvalidProductCodeException", message="unknown product")
    timeout = Outcome("retry", code="ReadTimeoutError", message="timed out")
    client = FakeClient(script=[refused, timeout, refused])  # egress_gb, vcpus, vcpus again
    Sender(ledger, cfg, client, clock).run()
    by_dim = {h.dimension: h for h in ledger.hours()}
    sent = {d: sum(c.dimension == d for c in client.calls) for d in by_dim}
    assert {d: h.attempts for d, h in by_dim.items()} == sent == {"egress_gb": 1, "vcpus": 2}
    assert {d: h.refusals for d, h in by_dim.items()} == {"egress_gb": 1, "vcpus": 1}
    # vcpus timed out once (maybe recorded), then was refused: never re-issued
    clock.advance(3600)
    client = FakeClient()
    report = Sender(ledger, make_config(tmp_path, dims=TWO_DIMS), client, clock).run()
    assert report.reissued == [("egress_gb", H)]
    assert {(c.dimension, c.product_code) for c in client.calls} == {
        ("egress_gb", PRODUCT), ("vcpus", "oldcode")
    }  # fmt: skip


def reissue_update(db: sqlite3.Connection) -> None:
    db.execute("UPDATE hours SET product_code = 'x', client_token = 'y', reissues = reissues + 1")


def test_a_tried_hour_without_an_error_is_never_reissued(tmp_path: Path) -> None:
    """attempts > 0 with last_error NULL (a request left, no answer): the trigger must fire, and
    a NULL in its condition must not switch it off."""
    ledger = sealed(tmp_path)[1]
    ledger.db.execute("UPDATE hours SET attempts = 1, last_error = NULL")
    with pytest.raises(sqlite3.IntegrityError):
        reissue_update(ledger.db)
    # migration 2's trigger alone (a ledger a developer migrated to 2) is NULL-safe too
    from agent.ledger.migrations import _MIGRATIONS, _split_sql

    db = sqlite3.connect(":memory:")
    for v in (1, 2):
        for statement in _split_sql(_MIGRATIONS[v]):
            db.execute(statement)
    db.execute(
        "INSERT INTO hours (dimension, hour, product_code, quantity, is_decimal, timestamp, "
        "client_token, samples, raw, state, attempts, last_error, sealed_at, next_attempt) "
        "VALUES ('d', 0, 'p', '1', 0, 3540, 't', 1, '1', 'pending', 1, NULL, 3600, 3600)"
    )
    with pytest.raises(sqlite3.IntegrityError):
        reissue_update(db)


def test_migration_4_keeps_held_hours_reissuable_and_tried_ones_not(tmp_path: Path) -> None:
    from agent.ledger.migrations import _MIGRATIONS, _split_sql

    db = sqlite3.connect(tmp_path / "ledger.db")
    for v in (1, 2, 3):
        for statement in _split_sql(_MIGRATIONS[v]):
            db.execute(statement)
    db.execute("PRAGMA user_version = 3")
    for dim, attempts, error in [
        ("refused", 3, "InvalidProductCodeException: unknown"),
        ("timeout", 1, "ReadTimeoutError: timed out"),
        ("untried", 0, None),
    ]:
        db.execute(
            "INSERT INTO hours (dimension, hour, product_code, quantity, is_decimal, timestamp, "
            "client_token, samples, raw, state, attempts, last_error, sealed_at, next_attempt) "
            "VALUES (?, 0, 'p', '1', 0, 3540, 't', 1, '1', 'pending', ?, ?, 3600, 3600)",
            (dim, attempts, error),
        )
    db.commit()
    db.close()
    ledger = Ledger(tmp_path)
    done = {
        h.dimension: ledger.reissue(h.dimension, 0, product_code="x", client_token="y", now=4000)
        for h in ledger.hours()
    }
    assert done == {"refused": True, "timeout": False, "untried": True}
