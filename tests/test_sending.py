from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from agent import windows as sealing
from agent.aggregate import Quantity
from agent.commands.status import next_send
from agent.config import Config
from agent.ledger import Ledger
from agent.modes.instance import Sender, seal_hours
from agent.sending.outcomes import Outcome
from agent.sending.policy import BACKOFF_CAP, backoff, due
from agent.sending.send_pass import note_unreachable
from agent.windows import EXPIRY
from tests.billing import FakeClient, H, make_config, retry
from tests.fakes import FakeClock
from tests.test_sealing import fill


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Config, Ledger, FakeClock]:
    cfg = make_config(tmp_path)
    ledger = Ledger(cfg.state_dir)
    for hour in (H, H + 3600):
        fill(ledger, "vcpus", hour, 60)
    clock = FakeClock(H + 2 * 3600)
    seal_hours(ledger, cfg, clock.time(), offset=30)
    return cfg, ledger, clock


def work_due(ledger: Ledger, now: float) -> bool:
    """The daemon's question before it starts a sender."""
    when = due(ledger.send_state(), ledger.pending())
    return when is not None and when <= now


def health(cfg: Config) -> dict:
    return json.loads((cfg.state_dir / "health.json").read_text())


def test_sends_due_hours_oldest_first_with_the_sealed_request(setup) -> None:
    cfg, ledger, clock = setup
    clock.advance(30)  # the instance's send slot
    client = FakeClient()
    sealed = {h.hour: h for h in ledger.pending()}
    report = Sender(ledger, cfg, client, clock).run()
    assert [c.timestamp for c in client.calls] == [H + 3540, H + 3600 + 3540]
    for call in client.calls:
        h = sealed[call.timestamp // 3600 * 3600]
        assert (call.quantity, call.client_token, call.product_code) == (
            h.quantity,
            h.client_token,
            h.product_code,
        )
    assert len(report.sent) == 2
    assert [h.state for h in ledger.hours()] == ["sent", "sent"]
    assert all(h.record_id for h in ledger.hours())
    assert health(cfg) | {"last_success": None} == {
        "ok": True, "authorized": True, "last_success": None, "failing_since": None,
        "pending_hours": 0, "reason": None, "storage": None,
    }  # fmt: skip


def test_nothing_is_sent_before_the_send_slot(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    ledger = Ledger(cfg.state_dir)
    fill(ledger, "vcpus", H, 3)
    clock = FakeClock(H + 3600 + 5)
    seal_hours(ledger, cfg, clock.time(), offset=120)
    assert not work_due(ledger, clock.time())
    assert next_send(ledger, cfg, clock.time()) == H + 3600 + 120
    client = FakeClient()
    Sender(ledger, cfg, client, clock).run()
    assert client.calls == []
    clock.advance(120)
    assert work_due(ledger, clock.time())


def test_retry_resends_the_identical_request(setup) -> None:
    cfg, ledger, clock = setup
    clock.advance(30)
    # 5xx, throttling, a dropped connection and a lost answer, then success
    client = FakeClient(
        script=[
            retry("InternalServiceErrorException"),
            retry(),
            retry("ConnectionClosedError"),
            retry("ReadTimeoutError"),
        ]
    )
    Sender(ledger, cfg, client, clock, rng=random.Random(1)).run()
    first = [c for c in client.calls if c.timestamp == H + 3540]
    assert len(first) == 5
    assert len({(c.client_token, c.quantity, c.timestamp) for c in first}) == 1
    oldest = ledger.hours()[0]
    assert (oldest.state, oldest.attempts) == ("sent", 5)


def test_a_long_backoff_ends_the_pass_and_waits(setup) -> None:
    cfg, ledger, clock = setup
    clock.advance(30)
    for _ in range(8):  # backoff up to 300 s: longer than the pass's patience
        ledger.back_off(clock.time(), "ThrottlingException", lambda failures: 0.0)
    client = FakeClient(script=[retry()])
    rng = random.Random(0)
    report = Sender(ledger, cfg, client, clock, rng=rng).run(deadline=clock.time() + 1)
    assert len(client.calls) == 1 and report.retry
    assert health(cfg)["ok"] is False
    assert health(cfg)["failing_since"] is not None
    assert health(cfg)["pending_hours"] == 2
    assert not work_due(ledger, clock.time())  # backing off
    clock.advance(BACKOFF_CAP + 1)
    assert work_due(ledger, clock.time())
    Sender(ledger, cfg, client, clock).run()
    assert health(cfg)["ok"] is True and health(cfg)["failing_since"] is None


def test_access_denied_pauses_until_dry_run_passes(setup) -> None:
    cfg, ledger, clock = setup
    clock.advance(30)
    client = FakeClient(
        script=[Outcome("unauthorized", code="AccessDeniedException")],
        dry_script=[Outcome("unauthorized", code="AccessDeniedException")],
    )
    report = Sender(ledger, cfg, client, clock).run()
    assert report.paused and len(client.calls) == 1
    assert ledger.send_state().authorized is False
    assert health(cfg)["authorized"] is False
    assert not work_due(ledger, clock.time())
    clock.advance(300)
    assert work_due(ledger, clock.time())
    report = Sender(ledger, cfg, client, clock).run()  # DryRun refused again: still paused
    assert report.paused and client.dry_runs == 1 and len(client.calls) == 1
    clock.advance(300)
    report = Sender(ledger, cfg, client, clock).run()  # DryRun passes: both hours go
    assert client.dry_runs == 2 and len(report.sent) == 2
    assert [h.state for h in ledger.hours()] == ["sent", "sent"]


def test_startup_dry_run_failing_to_connect_backs_off(setup) -> None:
    cfg, ledger, clock = setup
    ledger.schedule_dryrun(clock.time())
    client = FakeClient(dry_script=[retry("EndpointConnectionError")])
    report = Sender(ledger, cfg, client, clock).run()
    assert report.dry_run == "retry"
    assert ledger.send_state().dryrun_due > clock.time()
    assert health(cfg)["reason"].startswith("DryRun: EndpointConnectionError")


def test_hours_past_the_window_expire_without_a_call(setup) -> None:
    cfg, ledger, clock = setup
    clock.t = H + 3540 + EXPIRY + 1  # the first hour is out of the window, the second is not
    client = FakeClient()
    report = Sender(ledger, cfg, client, clock).run()
    assert report.expired == [("vcpus", H)]
    assert [c.timestamp for c in client.calls] == [H + 3600 + 3540]
    assert [h.state for h in ledger.hours()] == ["expired", "sent"]


def test_an_hour_that_expires_never_sent_shows_no_attempt(setup) -> None:
    cfg, ledger, clock = setup
    clock.advance(30)
    client = FakeClient(script=[retry()] * 100)  # the first hour is tried, the second never
    Sender(ledger, cfg, client, clock).run(deadline=clock.time() + 1)
    assert client.calls and {c.timestamp for c in client.calls} == {H + 3540}
    clock.t = H + 3600 + 3540 + EXPIRY  # both out of the window
    sent = len(client.calls)
    Sender(ledger, cfg, client, clock).run()
    tried, never = ledger.hours()
    assert len(client.calls) == sent
    assert (tried.state, tried.attempts, tried.last_error) == (
        "expired", sent, "ThrottlingException: try later"
    )  # fmt: skip
    assert (never.state, never.attempts, never.last_error) == (
        "expired", 0, "older than the 6 h MeterUsage window"
    )  # fmt: skip


def test_one_rule_for_when_a_send_run_is_due(setup) -> None:
    cfg, ledger, clock = setup
    first, second = ledger.pending()
    assert due(ledger.send_state(), [first, second]) == first.next_attempt
    ledger.back_off(clock.time(), "ThrottlingException", lambda failures: 100.0)
    assert due(ledger.send_state(), [second]) == clock.time() + 100  # the backoff holds it
    ledger.deauthorize(clock.time(), "AccessDeniedException", clock.time() + 9 * 3600)
    # paused: no send, but the run that expires the oldest hour is still due
    assert due(ledger.send_state(), [first, second]) == first.timestamp + EXPIRY
    assert next_send(ledger, cfg, clock.time()) == first.timestamp + EXPIRY
    clock.t = first.timestamp + EXPIRY
    Sender(ledger, cfg, FakeClient(), clock).run()
    assert ledger.hours()[0].state == "expired"


def test_next_send_with_nothing_pending_is_the_open_hours_slot(setup) -> None:
    cfg, ledger, clock = setup
    clock.advance(30)
    Sender(ledger, cfg, FakeClient(), clock).run()
    assert ledger.pending() == [] and due(ledger.send_state(), []) is None
    offset = sealing.send_offset(ledger.get_meta("instance_id") or "", cfg.metering.send_window)
    assert next_send(ledger, cfg, clock.time()) == H + 3 * 3600 + offset


def test_service_timestamp_out_of_bounds_expires(setup) -> None:
    cfg, ledger, clock = setup
    clock.advance(30)
    client = FakeClient(script=[Outcome("expired", code="TimestampOutOfBoundsException")])
    Sender(ledger, cfg, client, clock).run()
    first = ledger.hours()[0]
    assert (first.state, first.last_error) == ("expired", "TimestampOutOfBoundsException")


@pytest.mark.parametrize(
    "code",
    ["DuplicateRequestException", "IdempotencyConflictException", "CustomerNotEntitledException"],
)
def test_final_errors_reject_and_keep_the_hour(setup, code: str) -> None:
    cfg, ledger, clock = setup
    clock.advance(30)
    client = FakeClient(script=[Outcome("rejected", code=code, message="no")])
    report = Sender(ledger, cfg, client, clock).run()
    assert report.rejected == [("vcpus", H, f"{code}: no")]
    assert [h.state for h in ledger.hours()] == ["rejected", "sent"]
    assert ledger.hours()[0].last_error == f"{code}: no"


def test_flush_ignores_send_slots_and_retries_within_the_deadline(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    ledger = Ledger(cfg.state_dir)
    fill(ledger, "vcpus", H, 3)
    clock = FakeClock(H + 200)
    seal_hours(ledger, cfg, clock.time(), offset=500, include_current=True)
    client = FakeClient(script=[retry(), retry()])
    report = Sender(ledger, cfg, client, clock, rng=random.Random(3)).run(
        flush=True, deadline=clock.time() + 30
    )
    assert len(client.calls) == 3 and len(report.sent) == 1


def test_flush_deadline_leaves_hours_pending(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    ledger = Ledger(cfg.state_dir)
    fill(ledger, "vcpus", H, 3)
    clock = FakeClock(H + 200)
    seal_hours(ledger, cfg, clock.time(), offset=0, include_current=True)
    client = FakeClient(script=[retry()] * 100)
    Sender(ledger, cfg, client, clock).run(flush=True, deadline=clock.time() + 30)
    assert clock.time() <= H + 200 + 30 + BACKOFF_CAP
    assert [h.state for h in ledger.hours()] == ["pending"]


def test_backoff_is_capped_full_jitter() -> None:
    rng = random.Random(7)
    for n in range(0, 40):
        ceiling = min(BACKOFF_CAP, 2.0 * 2**n)
        draws = [backoff(n, rng) for _ in range(50)]
        assert all(0 <= d <= ceiling for d in draws)
    assert max(backoff(20, rng) for _ in range(200)) > BACKOFF_CAP * 0.9


def test_unreachable_region_backs_off_and_reports(setup) -> None:
    cfg, ledger, clock = setup
    clock.advance(30)
    note_unreachable(ledger, cfg, clock.time(), "IMDS unreachable", random.Random(1))
    assert not work_due(ledger, clock.time())
    assert health(cfg)["reason"] == "IMDS unreachable"


def test_health_counts_distinct_pending_hours(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    ledger = Ledger(cfg.state_dir)
    for dim in ("vcpus", "vcpu_hours"):
        fill(ledger, dim, H, 2)
    seal_hours(ledger, cfg, H + 3600, offset=0)
    clock = FakeClock(H + 3600)
    Sender(ledger, cfg, FakeClient(script=[retry()]), clock).run(deadline=clock.time())
    data = health(cfg)
    assert data["pending_hours"] == 1
    mode = (cfg.state_dir / "health.json").stat().st_mode & 0o777
    assert mode == 0o644


def test_quantity_types_reach_the_client(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    ledger = Ledger(cfg.state_dir)
    fill(ledger, "vcpu_hours", H, 30)
    fill(ledger, "vcpus", H, 30)
    seal_hours(ledger, cfg, H + 3600, offset=0)
    client = FakeClient()
    Sender(ledger, cfg, client, FakeClock(H + 3600)).run()
    assert {c.dimension: c.quantity for c in client.calls} == {
        "vcpu_hours": Quantity("1.000"),
        "vcpus": Quantity(2),
    }


def test_a_flush_spends_no_time_on_a_due_dry_run_unless_paused(setup) -> None:
    """The stop flush has a few seconds: a due DryRun waits for the next pass, unless sending is
    paused (then the DryRun is what may unpause it)."""
    cfg, ledger, clock = setup
    ledger.schedule_dryrun(clock.time())
    client = FakeClient()
    report = Sender(ledger, cfg, client, clock).run(flush=True, deadline=clock.time() + 30)
    assert client.dry_runs == 0 and len(report.sent) == 2
    assert ledger.send_state().dryrun_due is not None  # still due, for the next pass
    ledger.deauthorize(clock.time(), "not authorized", clock.time())
    fill(ledger, "vcpus", H + 2 * 3600, 3)
    seal_hours(ledger, cfg, clock.time() + 3600, offset=0)
    Sender(ledger, cfg, client, clock).run(flush=True, deadline=clock.time() + 30)
    assert client.dry_runs == 1


def test_a_flush_caps_each_calls_timeouts_at_the_time_left() -> None:
    from agent.commands.run import call_timeouts

    clock = FakeClock(H)
    assert call_timeouts(clock, None) == (5.0, 15.0)
    assert call_timeouts(clock, H + 8) == (5.0, 8.0)
    assert call_timeouts(clock, H + 0.2) == (1.0, 1.0)  # at least 1 s


@pytest.mark.parametrize(
    ("platform", "policy", "code", "refused"),
    [
        ("ecs", None, "UnrecognizedClientException", True),  # bad credentials at start: 77
        ("eks", None, "InvalidEndpointRegionException", True),  # the wrong region
        ("ecs", None, "ThrottlingException", False),  # throttling keeps retrying
        ("ecs", None, "EndpointConnectionError", False),  # so does the network
        ("ecs", "continue", "UnrecognizedClientException", False),  # the seller chose continue
        ("ec2", None, "UnrecognizedClientException", False),  # EC2: keep sampling, retry
    ],
)
def test_a_start_up_dry_run_refused_for_its_signature_pauses_sending_under_exit(
    tmp_path: Path, platform: str, policy: str | None, code: str, refused: bool
) -> None:
    """SPEC: with on_check_failure exit (ECS/EKS default), a start-up DryRun failing with anything
    but throttling, a 5xx or the network ends `run` with 77: the sender pauses (its exit is 77)."""
    extra = f"platform: {platform}\n"
    if policy:
        extra += f"metering: {{on_check_failure: {policy}}}\n"
    cfg = make_config(tmp_path, extra)
    ledger = Ledger(cfg.state_dir)
    clock = FakeClock(H)
    ledger.schedule_dryrun(clock.time())
    client = FakeClient(dry_script=[retry(code)])
    report = Sender(ledger, cfg, client, clock).run()
    assert report.paused is refused
    assert ledger.send_state().authorized is (False if refused else None)


def test_after_a_passing_dry_run_a_signature_error_is_retried_not_a_refusal(
    tmp_path: Path,
) -> None:
    cfg = make_config(tmp_path, "platform: ecs\n")
    ledger = Ledger(cfg.state_dir)
    clock = FakeClock(H)
    ledger.authorize()  # the start-up check passed earlier
    ledger.schedule_dryrun(clock.time())
    client = FakeClient(dry_script=[retry("UnrecognizedClientException")])
    report = Sender(ledger, cfg, client, clock).run()
    assert not report.paused and ledger.send_state().authorized is True
