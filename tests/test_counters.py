"""Counter differencing: per-series rules, the boot-id reboot rule, old saved state, network
interfaces (selection, disappearance, re-creation), with fake sources."""

from __future__ import annotations

import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import pytest

from agent import config
from agent.collecting.sampling import Sampler, counter_parts
from agent.collectors import Reading, Registry, Sources, series_key, series_labels
from agent.collectors.system import SystemCollector
from agent.errors import ConfigError
from tests.conftest import PRODUCT
from tests.fakes import FakeHost, FakePsutil, Net

D = Decimal


def series(**values: int) -> Reading:
    """A reading with one series per keyword: `a=5` is the series {"s": "a"} at 5."""
    return Reading.of_series(({"s": k}, D(v)) for k, v in values.items())


def step(reading: Reading, saved: dict[str, Any] | None, boot: str | None = "b1") -> tuple:
    value, _, new = counter_parts(reading, boot, saved)
    return value, new


class TestSeriesKey:
    def test_canonical_whatever_the_order(self) -> None:
        assert series_key({"b": "2", "a": "1"}) == series_key({"a": "1", "b": "2"})
        assert series_key({"a": "1"}) != series_key({"a": "1", "b": ""})

    def test_turns_back_into_labels(self) -> None:
        labels = {"path": 'C:\\new "x"\ny', "code": "200"}
        assert series_labels(series_key(labels)) == labels

    def test_of_series_sums_and_merges_duplicates(self) -> None:
        r = Reading.of_series([({"a": "1"}, D(2)), ({"a": "1"}, D(3)), ({"a": "2"}, D(4))])
        assert r.value == 9 and r.series == {'{"a":"1"}': 5, '{"a":"2"}': 4}


class TestPerSeries:
    def test_first_reading_of_the_dimension_is_zero(self) -> None:
        inc, state = step(series(a=500, b=70), None)
        assert inc == 0
        assert state["series"] == {'{"s":"a"}': "500", '{"s":"b"}': "70"}
        assert state["boot_id"] == "b1"

    def test_each_series_adds_its_own_increase(self) -> None:
        _, s1 = step(series(a=500, b=70), None)
        inc, _ = step(series(a=530, b=75), s1)
        assert inc == 35

    def test_a_series_that_disappears_stops_contributing(self) -> None:
        # The reported bug: the sum fell from 11,138 to 188 + the rest, and was billed as a reset.
        _, s1 = step(series(a=10_000, b=950, c=100), None)
        inc, s2 = step(series(b=1000, c=238), s1)
        assert inc == 50 + 138
        assert '{"s":"a"}' not in s2["series"]

    def test_a_series_that_goes_down_counts_only_its_own_new_value(self) -> None:
        _, s1 = step(series(a=10_000, b=950), None)
        inc, _ = step(series(a=10_020, b=7), s1)
        assert inc == 20 + 7

    def test_a_series_first_seen_later_counts_from_zero(self) -> None:
        _, s1 = step(series(a=100), None)
        inc, s2 = step(series(a=110, b=40), s1)
        assert inc == 10 + 40
        inc, _ = step(series(a=110, b=45), s2)
        assert inc == 5

    def test_empty_first_reading_then_series_appear(self) -> None:
        # A labelled counter with no children yet: the first reading is 0 with no series; the
        # first requests are then billed in full, not swallowed as the "first reading".
        _, s1 = step(series(), None)
        inc, _ = step(series(a=3, b=2), s1)
        assert inc == 5

    def test_a_changed_epoch_is_a_restart_even_above_the_baseline(self) -> None:
        one = Reading.of_series([({"s": "a"}, D(100))], epochs=[({"s": "a"}, "1000.5")])
        _, s1 = step(one, None)
        recreated = Reading.of_series([({"s": "a"}, D(130))], epochs=[({"s": "a"}, "2000.1")])
        assert step(recreated, s1)[0] == 130
        same = Reading.of_series([({"s": "a"}, D(130))], epochs=[({"s": "a"}, "1000.5")])
        assert step(same, s1)[0] == 30


class TestBootId:
    def test_a_new_boot_id_restarts_every_series(self) -> None:
        _, s1 = step(series(a=500, b=70), None, boot="b1")
        inc, s2 = step(series(a=900, b=80), s1, boot="b2")
        assert inc == 980 and s2["boot_id"] == "b2"

    def test_a_new_boot_id_restarts_a_plain_counter(self) -> None:
        _, s1 = step(Reading(D(500)), None, boot="b1")
        assert step(Reading(D(900)), s1, boot="b2")[0] == 900
        assert step(Reading(D(900)), s1, boot="b1")[0] == 400
        assert step(Reading(D(40)), s1, boot="b1")[0] == 40  # below the baseline: a reset

    def test_no_boot_id_on_this_kernel_means_same_boot_unless_below(self) -> None:
        _, s1 = step(Reading(D(500)), None, boot=None)
        assert step(Reading(D(900)), s1, boot=None)[0] == 400
        assert step(Reading(D(300)), s1, boot=None)[0] == 300

    def test_psutil_boot_time_moving_is_not_a_reset(self, tmp_path: Path) -> None:
        """A wall-clock step moves psutil's boot time (now - uptime); only the boot id counts."""
        host = FakeHost(tmp_path)
        host.add_interface("eth0", device=True)
        ps = FakePsutil()
        ps.nics["eth0"] = Net(50 * 2**30, 0)
        sampler, dim = sampler_for(tmp_path, host, ps, "{type: system, metric: net_sent_bytes}")
        first = sampler.take(dim, 0.0, None)
        ps.boot += 3600  # the clock was stepped by an hour after boot
        ps.nics["eth0"] = Net(50 * 2**30 + 2**20, 0)
        assert sampler.take(dim, 60.0, first.state).value == 2**20  # 1 MB, not 50 GB
        host.boot("boot-2")  # a real reboot: counters started again
        ps.nics["eth0"] = Net(4096, 0)
        assert sampler.take(dim, 120.0, first.state).value == 4096


class TestOldSavedState:
    """State saved by agents that kept psutil's boot time and one total."""

    OLD: ClassVar[dict[str, Any]] = {"baseline": "500", "boot_time": 1_700_000_000.0}

    def test_same_boot_unless_below_the_baseline(self) -> None:
        assert step(Reading(D(800)), self.OLD)[0] == 300
        assert step(Reading(D(40)), self.OLD)[0] == 40

    def test_a_series_reading_compares_its_total_once_then_goes_per_series(self) -> None:
        inc, state = step(series(a=520, b=30), self.OLD)
        assert inc == 50
        assert state["series"] == {'{"s":"a"}': "520", '{"s":"b"}': "30"}
        assert step(series(b=35), state)[0] == 5

    def test_network_compares_with_what_the_old_agent_read(self, tmp_path: Path) -> None:
        """The old baseline counted every interface; the migrating reading compares the same."""
        host = FakeHost(tmp_path)
        host.add_interface("eth0", device=True)
        host.add_interface("lo", device=False)
        ps = FakePsutil()
        ps.nics = {"eth0": Net(10_000, 0), "lo": Net(90_000, 0)}
        sampler, dim = sampler_for(tmp_path, host, ps, "{type: system, metric: net_sent_bytes}")
        old = {"counter": {"baseline": "100000", "boot_time": 1_700_000_000.0}}
        ps.nics = {"eth0": Net(10_500, 0), "lo": Net(90_200, 0)}
        s1 = sampler.take(dim, 60.0, old)
        # Not eth0's 10,500 since boot again: the old agent's increment for this one interval.
        assert s1.value == 700
        ps.nics = {"eth0": Net(11_000, 0), "lo": Net(99_000, 0)}
        assert sampler.take(dim, 120.0, s1.state).value == 500  # per interface from now on


def sampler_for(
    tmp_path: Path, host: FakeHost, ps: FakePsutil, collector: str, counter: str = ""
) -> tuple[Sampler, config.Dimension]:
    path = tmp_path / "c.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            dimensions:
              - name: d
                collector: {collector}
            """
        )
    )
    cfg = config.load(path)
    sources = Sources(psutil=ps, proc=host.proc, sys=host.sys)
    return Sampler(cfg, Registry(), sources), cfg.dimensions[0]


class TestInterfaces:
    def host(self, tmp_path: Path) -> tuple[FakeHost, FakePsutil]:
        host = FakeHost(tmp_path)
        for name, device in (("eth0", True), ("ens5", True), ("lo", False), ("veth1", False)):
            host.add_interface(name, device)
        ps = FakePsutil()
        ps.nics = {n: Net(1000, 10) for n in ("eth0", "ens5", "lo", "veth1")}
        return host, ps

    def test_default_is_the_device_backed_interfaces(self, tmp_path: Path) -> None:
        host, ps = self.host(tmp_path)
        sampler, dim = sampler_for(tmp_path, host, ps, "{type: system, metric: net_sent_bytes}")
        s1 = sampler.take(dim, 0.0, None)
        assert s1.raw == 2000
        ps.nics["lo"] = Net(50_000_000, 10)  # loopback traffic is not egress
        ps.nics["veth1"] = Net(7_000, 10)
        ps.nics["eth0"] = Net(1_300, 10)
        assert sampler.take(dim, 60.0, s1.state).value == 300

    def test_named_interfaces_by_glob(self, tmp_path: Path) -> None:
        host, ps = self.host(tmp_path)
        collector = "{type: system, metric: net_recv_bytes, interfaces: [eth*, 'veth?']}"
        sampler, dim = sampler_for(tmp_path, host, ps, collector)
        s1 = sampler.take(dim, 0.0, None)
        assert s1.raw == 20
        ps.nics["veth1"] = Net(0, 510)
        ps.nics["ens5"] = Net(0, 99_999)  # not named
        assert sampler.take(dim, 60.0, s1.state).value == 500

    def test_an_interface_that_disappears_does_not_rebill_the_others(self, tmp_path: Path) -> None:
        host, ps = self.host(tmp_path)
        collector = "{type: system, metric: net_sent_bytes, interfaces: ['*']}"
        sampler, dim = sampler_for(tmp_path, host, ps, collector)
        ps.nics["eth0"] = Net(30 * 2**30, 0)  # 30 GB since boot
        s1 = sampler.take(dim, 0.0, None)
        del ps.nics["veth1"]
        host.remove_interface("veth1")
        ps.nics["eth0"] = Net(30 * 2**30 + 100, 0)
        assert sampler.take(dim, 60.0, s1.state).value == 100

    def test_an_interface_recreated_under_its_name_restarts(self, tmp_path: Path) -> None:
        host, ps = self.host(tmp_path)
        collector = "{type: system, metric: net_sent_bytes, interfaces: [veth1]}"
        sampler, dim = sampler_for(tmp_path, host, ps, collector)
        s1 = sampler.take(dim, 0.0, None)
        host.remove_interface("veth1")
        host.add_interface("veth1", device=False)  # new ifindex, counters from 0
        ps.nics["veth1"] = Net(1500, 0)  # above the old baseline of 1000
        assert sampler.take(dim, 60.0, s1.state).value == 1500

    def test_interfaces_only_for_network_metrics(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"collector\.interfaces: not used by metric"):
            SystemCollector.validate(
                {"metric": "cpu_count", "interfaces": ("eth0",)}, "dimensions[0].collector"
            )

    def test_counter_true_on_a_plain_collector_keeps_a_single_baseline(
        self, tmp_path: Path
    ) -> None:
        host, ps = self.host(tmp_path)
        sampler, dim = sampler_for(
            tmp_path, host, ps, "{type: system, metric: users, counter: true}"
        )
        s1 = sampler.take(dim, 0.0, None)
        assert s1.state is not None and s1.state["counter"] == {
            "boot_id": "boot-1",
            "baseline": "2",
        }


def test_boot_id_is_read_through_the_sources(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    host.boot("7c0f-boot")
    assert Sources(proc=host.proc).boot_id() == "7c0f-boot"
    assert Sources(proc=tmp_path / "no-proc").boot_id() is None  # no such kernel file: unknown
    real = Path("/proc/sys/kernel/random/boot_id")
    if real.exists():
        assert Sources().boot_id() == real.read_text().strip()
