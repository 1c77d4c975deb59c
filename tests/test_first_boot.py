"""The first boot of an instance made from an image: logs read from their length in the image
(image.json, by content, across a copy to another filesystem), counters that began after boot
counted from 0, and a counter absent from an answer counted whole when it appears.

Oracles: the lines written after the image was recorded, the increments applied after boot."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent.collecting.sampling import Sampler, counter_parts
from agent.collectors import NotYet, Reading, Registry, Sources, imagerecord
from agent.collectors.http import prometheus_reading
from agent.collectors.log import LogCollector
from agent.commands.run import earlier_ledger_this_boot
from agent.config import load
from tests.conftest import PRODUCT
from tests.fakes import FakeHost

HIT = b'10.0.0.1 "GET /api/v1/orders HTTP/1.1" 200\n'
MISS = b'10.0.0.2 "GET /static/app.js HTTP/1.1" 200\n'
JSON_HIT = b'{"service":"api","env":"prod","request":"GET /api/v1/orders","n":%d}\n'


def collector(path: Path | str, image: Any = None, **options: Any) -> LogCollector:
    opts = {
        "path": str(path),
        "pattern": '"(GET|POST) /api/',
        "mode": "count",
        "start_at": "end",
        "encoding": "utf-8",
        "max_line_bytes": 65536,
        **options,
    }
    LogCollector.validate(opts, "collector")
    return LogCollector(opts, Sources(image=image))


def lines(n: int, first: int) -> bytes:
    """`n` matching lines, numbered from `first` (real logs differ line by line: a time, an id)."""
    return b"".join(
        b'10.0.0.1 "GET /api/v1/orders/%d HTTP/1.1" 200\n' % i for i in range(first, first + n)
    )


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def baked(tmp: Path, files: dict[str, bytes]) -> Path:
    """A log folder as the image holds it."""
    folder = tmp / "image-logs"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def record_of(folder: Path) -> imagerecord.ImageRecord:
    return imagerecord.build(
        [str(p) for p in sorted(folder.iterdir())], "2026-12-01T00:00:00Z", "build-boot", None
    )


def boot_copy(folder: Path, where: Path) -> Path:
    """The image's folder as an instance made from it has it: a copy on another filesystem (new
    device and inodes, as an AMI's volume is)."""
    dest = where / "logs"
    shutil.copytree(folder, dest)
    return dest


@pytest.fixture
def other_fs(tmp_path: Path) -> Any:
    """A folder on a tmpfs (/dev/shm), another device than tmp_path's."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no tmpfs on another device here")
    where = Path(os.path.join(shm, f"first-boot-{os.getpid()}-{tmp_path.name}"))
    where.mkdir()
    yield where
    shutil.rmtree(where, ignore_errors=True)


def test_a_log_in_the_image_is_read_from_its_length_there_across_filesystems(
    tmp_path: Path, other_fs: Path
) -> None:
    folder = baked(tmp_path, {"access.log": (HIT + MISS) * 5})  # the seller's own lines
    record = record_of(folder)
    logs = boot_copy(folder, other_fs)
    live = logs / "access.log"
    assert os.stat(live).st_dev != record.logs[0].dev  # another device: identity by content
    append(live, HIT * 4)  # the product, before the agent's first reading
    c = collector(live, image=record)
    first = c.read(None)
    assert first.value == 4
    append(live, HIT * 9 + MISS)
    assert c.read(first.state).value == 9


def test_without_a_record_start_at_end_loses_what_came_before_the_first_reading(
    tmp_path: Path, other_fs: Path
) -> None:
    """Today's behaviour without prepare-image's record, and the loss it fixes."""
    folder = baked(tmp_path, {"access.log": (HIT + MISS) * 5})
    live = boot_copy(folder, other_fs) / "access.log"
    append(live, HIT * 4)
    c = collector(live, image=None)
    first = c.read(None)
    append(live, HIT * 9)
    assert first.value + c.read(first.state).value == 9


def test_a_log_not_in_the_image_is_read_from_its_beginning(tmp_path: Path) -> None:
    folder = baked(tmp_path, {"access.log": HIT * 5})
    record = record_of(folder)
    new = folder / "jobs.log"
    new.write_bytes(HIT * 3)  # a file the image did not hold, written before the first reading
    assert collector(new, image=record).read(None).value == 3


def test_a_log_replaced_since_the_image_is_read_from_its_beginning(tmp_path: Path) -> None:
    folder = baked(tmp_path, {"access.log": HIT * 5})
    record = record_of(folder)
    live = folder / "access.log"
    live.write_bytes(MISS + HIT * 6)  # truncated and written again: not the image's content
    assert collector(live, image=record).read(None).value == 6
    live.write_bytes(HIT * 2)  # shorter than in the image
    assert collector(live, image=record).read(None).value == 2


def test_logs_that_begin_alike_are_told_apart_by_their_last_block(tmp_path: Path) -> None:
    """JSON logs whose lines all begin alike: a file the image did not hold, longer than one
    that it held and alike in its first block, is not taken for it."""
    one = b"".join(JSON_HIT % n for n in range(200))
    folder = baked(tmp_path, {"a.log": one})
    record = record_of(folder)
    other = folder / "b.log"
    other.write_bytes(
        b"".join(JSON_HIT % n for n in range(150))
        + b"".join(JSON_HIT % (n + 1000) for n in range(100))
    )
    c = collector(other, image=record, pattern="GET /api/")
    assert c.read(None).value == 250  # all of it: not the image's a.log
    append(folder / "a.log", JSON_HIT % 7)
    assert collector(folder / "a.log", image=record, pattern="GET /api/").read(None).value == 1


def test_a_rotation_before_the_first_reading_loses_nothing_and_bills_nothing_twice(
    tmp_path: Path,
) -> None:
    """logrotate (create) ran at boot, before the agent's first reading: the image's log, with
    the product's first lines, is now access.log.1, and access.log is new."""
    folder = baked(tmp_path, {"access.log": lines(5, 100), "access.log.1": lines(7, 0)})
    record = record_of(folder)
    live = folder / "access.log"
    append(live, lines(4, 200))
    os.replace(folder / "access.log.1", folder / "access.log.2")
    os.replace(live, folder / "access.log.1")
    live.write_bytes(HIT * 2)
    c = collector(f"{live}", image=record)
    first = c.read(None)
    assert first.value == 4 + 2
    append(live, HIT * 3)
    append(folder / "access.log.1", HIT)  # the product still had the old file open
    assert c.read(first.state).value == 4


def test_a_compressed_copy_is_history_when_the_image_held_it_and_new_when_not(
    tmp_path: Path,
) -> None:
    folder = baked(tmp_path, {"access.log": HIT * 2, "access.log.2.gz": gzip.compress(HIT * 8)})
    record = record_of(folder)
    (folder / "access.log.3.gz").write_bytes(gzip.compress(HIT * 5))  # made at this boot
    assert collector(folder / "access.log", image=record).read(None).value == 5


def test_after_the_first_reading_saved_positions_decide(tmp_path: Path) -> None:
    folder = baked(tmp_path, {"access.log": HIT * 5})
    record = record_of(folder)
    live = folder / "access.log"
    append(live, HIT * 4)
    first = collector(live, image=record).read(None)
    append(live, HIT * 6)
    # a restart: a new collector (the record still claimed in this boot) reads on from the state
    assert collector(live, image=record).read(first.state).value == 6


# -- the record: written, claimed once --------------------------------------------------------


def test_the_record_is_claimed_once_by_the_first_boot(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    record, line = imagerecord.claim(state, "i-buyer", "boot-1", "t0")
    assert record is None and line == "no image record: start_at decides"
    log = tmp_path / "a.log"
    log.write_bytes(HIT * 3)
    imagerecord.write(state, imagerecord.build([str(log)], "t", "build-boot", "i-build"))
    assert oct(os.stat(state / "image.json").st_mode & 0o777) == "0o644"
    # on the build machine itself it never applies
    assert imagerecord.claim(state, "i-build", "build-boot-2", "t1")[0] is None
    assert "made on this instance" in imagerecord.describe(state, "i-build", "x")
    assert "the next `run`" in imagerecord.describe(state, "i-buyer", "boot-1")
    record, line = imagerecord.claim(state, "i-buyer", "boot-1", "t2")
    assert record is not None and [r.length for r in record.logs] == [len(HIT) * 3]
    assert line.startswith("first boot: image record of 1 file(s)")
    saved = json.loads((state / "image.json").read_text())
    assert saved["used"] == {"instance_id": "i-buyer", "boot_id": "boot-1", "at": "t2"}
    assert imagerecord.claim(state, "i-buyer", "boot-1", "t3")[0] is not None  # same boot
    assert "in use" in imagerecord.describe(state, "i-buyer", "boot-1")
    for instance, boot in (("i-buyer", "boot-2"), ("i-other", "boot-1")):
        record, line = imagerecord.claim(state, instance, boot, "t4")
        assert record is None and "used at the first boot of i-buyer" in line
    assert json.loads((state / "image.json").read_text())["used"]["at"] == "t2"


def test_without_the_build_instance_the_build_boot_is_refused(tmp_path: Path) -> None:
    imagerecord.write(tmp_path, imagerecord.build([], "t", "build-boot", None))
    assert imagerecord.claim(tmp_path, "i-x", "build-boot", "t")[0] is None
    assert imagerecord.claim(tmp_path, "i-x", "another-boot", "t")[0] is not None


def test_an_unusable_record_is_said_and_start_at_decides(tmp_path: Path) -> None:
    (tmp_path / "image.json").write_text("{not json")
    record, line = imagerecord.claim(tmp_path, "i", "b", "t")
    assert record is None and "image record unusable" in line and "start_at decides" in line
    assert (tmp_path / "image.json").read_text() == "{not json"  # left as found


def test_a_partial_last_line_is_not_in_the_record(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_bytes(HIT * 2 + b"10.0.0.1 GE")
    (entry,) = imagerecord.build([str(log)], "t", None, None).logs
    assert entry.length == len(HIT) * 2


# -- counters ----------------------------------------------------------------------------------

BOOT = Decimal(1_790_000_000)


def series(text: str) -> Reading:
    return prometheus_reading(text, "requests_total", [])


def test_a_counter_that_began_after_boot_counts_from_0_on_its_first_reading() -> None:
    text = (
        "# TYPE requests counter\n"
        'requests_total{code="200"} 40\nrequests_created{code="200"} 1790000100\n'
        'requests_total{code="500"} 3\nrequests_created{code="500"} 1789999000\n'
    )
    value, parts, _ = counter_parts(series(text), "b", None, BOOT)
    assert value == 40 and parts == {'{"code":"200"}': Decimal(40)}
    assert counter_parts(series(text), "b", None, None)[0] == 0  # boot time unknown: baseline


def test_process_start_time_stands_for_series_without_created() -> None:
    body = "# TYPE requests_total counter\nrequests_total 12\n"
    after = body + "process_start_time_seconds 1790000050.5\n"
    before = body + "process_start_time_seconds 1789990000\n"
    assert counter_parts(series(after), "b", None, BOOT)[0] == 12
    assert counter_parts(series(before), "b", None, BOOT)[0] == 0
    assert counter_parts(series(body), "b", None, BOOT)[0] == 0  # nothing says: baseline


def test_with_a_baseline_the_start_time_changes_nothing() -> None:
    text = (
        "# TYPE requests_total counter\nrequests_total 50\nprocess_start_time_seconds 1790000050\n"
    )
    _, _, state = counter_parts(series(text.replace("50\n", "20\n", 1)), "b", None, None)
    assert counter_parts(series(text), "b", state, BOOT)[0] == 30


def test_an_answer_without_the_metric_is_not_yet_and_the_metric_then_counts_whole(
    tmp_path: Path,
) -> None:
    with pytest.raises(NotYet):
        series("# TYPE other_total counter\nother_total 1\n")
    host = FakeHost(tmp_path)
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(
        f"""
product_code: {PRODUCT}
state_dir: {tmp_path / "state"}
dimensions:
  - name: requests
    collector: {{type: http, url: 'http://127.0.0.1:1/metrics', format: prometheus,
                 query: requests_total, counter: true}}
  - name: level
    collector: {{type: http, url: 'http://127.0.0.1:1/metrics', format: prometheus,
                 query: requests_total}}
"""
    )
    answers = ["# TYPE other_total counter\nother_total 1\n"]
    opener = _Opener(answers)
    cfg = load(cfg_path)
    sampler = Sampler(cfg, Registry(), Sources(proc=host.proc, extra={"http_opener": opener}))
    counter, level = cfg.dimensions
    first = sampler.take(counter, 0.0, None)
    assert first.value == 0 and first.warning and "no metric requests_total" in first.warning
    assert first.state is not None and first.state["counter"]["series"] == {}
    assert sampler.take(level, 0.0, None).error  # a level finds nothing: an error, as before
    answers[0] = '# TYPE requests_total counter\nrequests_total{worker="1"} 60\n'
    second = sampler.take(counter, 60.0, first.state)
    assert second.value == 60 and second.warning is None


class _Opener:
    """An http_opener answering the next body (Sources.extra, as the http tests use it)."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers

    def open(self, req: Any, timeout: float = 0) -> Any:
        return _Answer(self.answers[0].encode())


class _Answer:
    status = 200

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.headers = {"Content-Type": "text/plain; version=0.0.4"}

    def read(self, n: int = -1) -> bytes:
        return self.body

    def __enter__(self) -> _Answer:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def test_boot_time_is_read_from_proc_stat(tmp_path: Path) -> None:
    (tmp_path / "stat").write_text("cpu  1 2 3\nbtime 1790000000\nprocesses 5\n")
    assert Sources(proc=tmp_path).boot_time() == BOOT
    assert Sources(proc=tmp_path / "none").boot_time() is None
    real = Sources().boot_time()
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    assert real is not None and abs(float(real) - (time.time() - uptime)) < 5


def test_after_an_earlier_ledger_in_this_boot_a_counter_begun_after_boot_is_a_baseline(
    tmp_path: Path,
) -> None:
    """A fresh ledger is not always a first one: after `reset-ledger` (or a ledger deleted by
    hand) the counter may have been billed by the ledger before. `run` finds that ledger's health
    file or damaged copy, written since boot, and the counter's first reading is its baseline."""
    state = tmp_path / "state"
    state.mkdir()
    boot = Decimal(int(time.time()) - 600)
    assert earlier_ledger_this_boot(state, boot) is None  # nothing yet: a first ledger
    (state / "health.json").write_text("{}")
    assert earlier_ledger_this_boot(state, boot) == "health.json"
    os.utime(state / "health.json", (float(boot) - 60, float(boot) - 60))  # the last boot's
    assert earlier_ledger_this_boot(state, boot) is None
    (state / "ledger.db.damaged-20261206T080000Z").write_bytes(b"")
    assert earlier_ledger_this_boot(state, boot) == "ledger.db.damaged-20261206T080000Z"
    assert earlier_ledger_this_boot(state, None) is None  # boot time unknown: nothing to say

    host = FakeHost(tmp_path)
    (host.proc / "stat").write_text(f"cpu 1 2 3\nbtime {boot}\n")
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(
        f"""
product_code: {PRODUCT}
state_dir: {state}
dimensions:
  - name: requests
    collector: {{type: http, url: 'http://127.0.0.1:1/metrics', format: prometheus,
                 query: requests_total, counter: true}}
"""
    )
    began = int(boot) + 100  # after boot
    opener = _Opener([f"# TYPE requests counter\nrequests_total 40\nrequests_created {began}\n"])
    (dim,) = load(cfg_path).dimensions
    for count_from_boot, billed in ((True, 40), (False, 0)):
        sources = Sources(proc=host.proc, extra={"http_opener": opener})
        sources.count_from_boot = count_from_boot
        sampler = Sampler(load(cfg_path), Registry(), sources)
        assert sampler.take(dim, 0.0, None).value == billed


def test_the_product_lock_is_the_trace_of_an_earlier_run_when_the_state_dir_is_gone(
    tmp_path: Path,
) -> None:
    """The state dir deleted whole (health file and ledger with it): the product lock, kept in
    the run dir until the next boot (RuntimeDirectoryPreserve=yes), still shows that this product
    was metered earlier in this boot, so the fresh ledger's counters start from a baseline."""
    from agent.host.locks import ProductLock

    run_dir, state = tmp_path / "run", tmp_path / "state"
    state.mkdir()
    boot = Decimal(int(time.time()) - 600)
    first = ProductLock("prod-x", tmp_path / "config.yaml", run_dir)
    assert first.acquire() and first.written_before is None  # the first run of this boot
    first._file.close()  # type: ignore[union-attr]  # the run ends
    again = ProductLock("prod-x", tmp_path / "config.yaml", run_dir)
    assert again.acquire()
    written = {str(again.path): again.written_before}
    assert earlier_ledger_this_boot(state, boot, written) == str(again.path)
    again._file.close()  # type: ignore[union-attr]  # the run ends
    os.utime(again.path, (float(boot) - 60, float(boot) - 60))  # a lock file from before boot
    last = ProductLock("prod-x", tmp_path / "config.yaml", run_dir)
    assert last.acquire()
    assert earlier_ledger_this_boot(state, boot, {str(last.path): last.written_before}) is None
    last._file.close()  # type: ignore[union-attr]  # the run ends
    unit = (Path(__file__).parent.parent / "packaging" / "metering-agent.service").read_text()
    assert "RuntimeDirectoryPreserve=yes" in unit.splitlines()
