from __future__ import annotations

import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

from agent import config
from agent.collecting.sampling import Sampler
from agent.collectors import Registry, Sources
from agent.collectors.system import SystemCollector
from tests.conftest import PRODUCT
from tests.fakes import Disk, FakeHost, FakePsutil, Net

D = Decimal
GIB = 2**30


def read(ps: FakePsutil, host: FakeHost | None = None, **options: object) -> Decimal:
    opts = {"path": None, "name": None, "interfaces": None, **options}
    sources = Sources(psutil=ps) if host is None else Sources(psutil=ps, sys=host.sys)
    return SystemCollector(opts, sources).read(None).value


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"metric": "cpu_count"}, D(4)),
        ({"metric": "cpu_percent"}, D("12.5")),
        ({"metric": "memory_total_gib"}, D(8)),
        ({"metric": "memory_used_gib"}, D(2)),  # total - available
        ({"metric": "disk_used_gib"}, D(25)),
        ({"metric": "disk_used_gib", "path": "/data"}, D("1.5")),
        ({"metric": "net_sent_bytes"}, D(1000)),
        ({"metric": "net_recv_bytes"}, D(5000)),
        ({"metric": "process_count"}, D(4)),
        ({"metric": "process_count", "name": "^nginx$"}, D(2)),
        ({"metric": "process_count", "name": "py"}, D(1)),
        ({"metric": "users"}, D(2)),
    ],
)
def test_each_metric(tmp_path: Path, options: dict[str, object], expected: Decimal) -> None:
    ps = FakePsutil()
    ps.disks["/data"] = Disk(10 * GIB, int(1.5 * GIB), 0)
    host = FakeHost(tmp_path)
    host.add_interface("eth0", device=True)
    assert read(ps, host, **options) == expected


def test_cpu_percent_is_primed_at_construction() -> None:
    ps = FakePsutil()
    collector = SystemCollector({"metric": "cpu_percent"}, Sources(psutil=ps))
    assert ps.percent_calls == 1  # the priming call; the first sample measures from here
    collector.read(None)
    assert ps.percent_calls == 2


def test_missing_disk_path_is_a_missing_source() -> None:
    from agent.collectors import SourceMissing

    collector = SystemCollector({"metric": "disk_used_gib", "path": "/nope"}, Sources(FakePsutil()))
    with pytest.raises(SourceMissing):
        collector.probe()


def test_kinds() -> None:
    assert SystemCollector.kind({"metric": "net_sent_bytes"}) == "increment"
    assert SystemCollector.cumulative({"metric": "net_sent_bytes"})
    assert SystemCollector.kind({"metric": "cpu_count"}) == "level"
    assert not SystemCollector.cumulative({"metric": "users"})


def make_sampler(
    tmp_path: Path, ps: FakePsutil, host: FakeHost | None = None
) -> tuple[Sampler, config.Config]:
    path = tmp_path / "c.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            dimensions:
              - name: egress
                collector: {{type: system, metric: net_sent_bytes}}
              - name: users
                collector: {{type: system, metric: users, counter: true}}
              - name: cpus
                collector: {{type: system, metric: cpu_count}}
            """
        )
    )
    cfg = config.load(path)
    host = host or FakeHost(tmp_path)
    return Sampler(cfg, Registry(), Sources(psutil=ps, proc=host.proc, sys=host.sys)), cfg


def test_sampler_differences_byte_counters_across_readings(tmp_path: Path) -> None:
    ps = FakePsutil()
    host = FakeHost(tmp_path)
    host.add_interface("eth0", device=True)
    sampler, cfg = make_sampler(tmp_path, ps, host)
    egress = cfg.dimensions[0]
    first = sampler.take(egress, 0.0, None)
    assert (first.raw, first.value) == (D(1000), D(0))
    ps.nics["eth0"] = Net(bytes_sent=4000, bytes_recv=0)
    second = sampler.take(egress, 60.0, first.state)
    assert second.value == D(3000)
    # reboot: counters restart from zero under a new boot id, even above the old baseline
    ps.nics["eth0"] = Net(bytes_sent=9000, bytes_recv=0)
    host.boot("boot-2")
    third = sampler.take(egress, 120.0, second.state)
    assert third.value == D(9000)
    # a 32-bit wrap looks like a drop: never negative
    ps.nics["eth0"] = Net(bytes_sent=10, bytes_recv=0)
    assert sampler.take(egress, 180.0, third.state).value == D(10)


def test_counter_true_on_a_level_metric(tmp_path: Path) -> None:
    ps = FakePsutil()
    sampler, cfg = make_sampler(tmp_path, ps)
    users = cfg.dimensions[1]
    s1 = sampler.take(users, 0.0, None)
    ps.user_list = [object()] * 5
    assert sampler.take(users, 60.0, s1.state).value == D(3)


def test_a_failing_collector_is_contained(tmp_path: Path) -> None:
    ps = FakePsutil()

    def broken(logical: bool = True) -> int:
        raise RuntimeError("psutil exploded")

    ps.cpu_count = broken  # type: ignore[method-assign]
    sampler, cfg = make_sampler(tmp_path, ps)
    sample = sampler.take(cfg.dimensions[2], 0.0, None)
    assert sample.value is None and "psutil exploded" in (sample.error or "")
    assert sampler.take(cfg.dimensions[0], 0.0, None).error is None
