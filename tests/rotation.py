"""The harness of the logrotate tests: writers that are their own oracle, the real logrotate, the
agent's sampling path with simulated kill -9, and the on-disk count.

The oracle is what really happened, never a number a test wrote:
- A writer counts the matching lines it wrote, per *generation* (one file it opened: the inode its
  lines went to), so a test compares the ledger's billed total with the lines written.
- With `copytruncate`, logrotate itself loses the lines written between its copy and its truncate:
  there the oracle is `on_disk`, the matching lines in every file at the end, decompressed (SPEC).
- Where rotations delete files faster than the agent reads them (`rotate 0`), a generation created
  and deleted between two readings can be missed (SPEC allows only that). With `serialise`, the
  harness knows every reading instant and, for each generation, whether its inode had a name at
  one of them (`Generation.seen`); the oracle is then the lines of the generations seen.

Application and logrotate agree on when the application lets go of a file: each logrotate
configuration's `postrotate` (what `invoke-rc.d nginx rotate` or `nginx -s reopen` is in real life)
makes the writer reopen its path and waits until it has (`reopen_script`). logrotate compresses and
deletes only after `postrotate` (seen in `logrotate -v` 3.21: rename, create, postrotate, then
compress and "removing old log"), so no line is ever written to an inode that logrotate is about to
compress or delete: every line written is on disk, and a held-open file is finished when it is read
to its end. `Generation.late` checks that premise.
"""

from __future__ import annotations

import bz2
import contextlib
import gc
import gzip
import logging
import logging.handlers
import lzma
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent import config
from agent.collecting.sampling import Sampler
from agent.collectors.base import Unread
from agent.ledger import Ledger
from tests.conftest import PRODUCT

LOGROTATE = "/usr/sbin/logrotate"
PATTERN = '"(GET|POST) /api/'
MATCHES = re.compile(PATTERN)
RATE = 2000  # lines per second
T0 = 1_800_000_000.0  # sample instants: one hour, one second apart
LOG_EPOCH = 1_796_515_200  # 2026-12-06 00:00:00 UTC: the time the lines' own timestamps start at

Format = Callable[[int], str]


def line(n: int) -> str:
    """A short access-log line, unique; odd lines match PATTERN."""
    if n % 2:
        return f'10.0.{n % 250}.1 - - [{n}] "GET /api/v1/orders/{n} HTTP/1.1" 200 {n % 999}\n'
    return f'10.0.{n % 250}.2 - - [{n}] "GET /static/app-{n}.js HTTP/1.1" 304 0\n'


def _request(n: int) -> str:
    return f"GET /api/v1/orders/{n} HTTP/1.1" if n % 2 else f"GET /static/app-{n}.js HTTP/1.1"


def combined(n: int) -> str:
    """nginx's and Apache's `combined` format; odd lines match PATTERN."""
    when = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(LOG_EPOCH + n // RATE))
    return (
        f'10.0.{n % 250}.{1 + n % 2} - - [{when}] "{_request(n)}" {200 if n % 2 else 304} '
        f'{n % 999} "https://shop.example.com/" "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) '
        'Gecko/20100101 Firefox/128.0"\n'
    )


# The same line at the top of every new file (a load balancer's health check logged as the first
# request after each reopen): with size-driven rotation, every file begins with 150 equal bytes.
HEALTH_CHECK = (
    '10.0.0.2 - - [06/Dec/2026:00:00:00 +0000] "GET /api/v1/health HTTP/1.1" 200 2 "-" '
    '"ELB-HealthChecker/2.0 (the same first line in every file: kube-probe/1.29)"\n'
)

# nginx with
#   log_format json_access escape=json
#     '{"source":"nginx","log":"access","vhost":"$server_name","server_addr":"$server_addr",'
#     '"server_port":"$server_port","scheme":"$scheme","protocol":"$server_protocol",'
#     '"ssl_protocol":"$ssl_protocol","ssl_cipher":"$ssl_cipher","remote_addr":"$remote_addr",'
#     '"request":"$request","status":"$status","body_bytes_sent":"$body_bytes_sent",'
#     '"request_time":"$request_time","request_id":"$request_id","time_iso8601":"$time_iso8601"}';
# The fields constant for one server come first, the time last: every line, so every file and every
# rotated copy, begins with the same 229 bytes.
JSON_HEAD = (
    '{"source":"nginx","log":"access","vhost":"shop.example.com","server_addr":"10.0.12.34",'
    '"server_port":"443","scheme":"https","protocol":"HTTP/1.1","ssl_protocol":"TLSv1.3",'
    '"ssl_cipher":"TLS_AES_256_GCM_SHA384",'
)


def nginx_json(n: int) -> str:
    """A line of `json_access` above; odd lines match PATTERN."""
    when = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(LOG_EPOCH + n // RATE))
    return (
        f'{JSON_HEAD}"remote_addr":"10.0.{n % 250}.{1 + n % 2}","request":"{_request(n)}",'
        f'"status":"{200 if n % 2 else 304}","body_bytes_sent":"{n % 999}",'
        f'"request_time":"0.{n % 997:03d}","request_id":"{(n * 2654435761) % (1 << 64):016x}",'
        f'"time_iso8601":"{when}"}}\n'
    )


def matching(lines: list[str]) -> int:
    return sum(1 for ln in lines if MATCHES.search(ln))


@dataclass
class Generation:
    """One file a writer wrote to, from its open to its close."""

    path: str  # the name it was opened by
    ino: int
    lines: int = 0
    matching: int = 0
    # Matching lines of writes after which the inode had no name any more (st_nlink 0): lines that
    # may not be on disk. The harness's reopen handshake makes it 0; a test checks it.
    late: int = 0
    # Set by `Writer.mark_seen` (only when the writer watches): the inode had a name when a
    # reading began, so that reading could see it; `gone` once it had none.
    seen: bool = False
    gone: bool = False
    watch: int | None = None  # a duplicate of its descriptor, to read its link count


class Writer(threading.Thread):
    """Appends `fmt(n)` lines at about RATE per second and counts the matching ones per
    generation. Reopens its path when the path names another inode (what an application does when
    logrotate's postrotate signals it), and at once when `flag` exists, then removes `flag`: the
    acknowledgement `reopen_script` waits for. Lines written through the old handle before the
    reopen land in the renamed copy. `first`: the line written first into every new (empty) file.

    With `watch`, it keeps a duplicate descriptor of each generation so that `mark_seen` can tell,
    at each reading, which generations still have a name (the harness must call `note_rotation`
    after each rotation, which closes the duplicates of the generations without one, so their inode
    numbers can be reused as they would be without the harness)."""

    def __init__(
        self,
        path: Path,
        fmt: Format = line,
        first: str | None = None,
        flag: Path | None = None,
        watch: bool = False,
    ) -> None:
        super().__init__(daemon=True)
        self.path, self.fmt, self.first, self.flag, self.watch = path, fmt, first, flag, watch
        self.stop, self.n, self.lock = threading.Event(), 0, threading.Lock()
        self.generations: list[Generation] = []
        self.f: Any = None
        self._open()

    @property
    def written(self) -> int:
        """Matching lines written, in every generation."""
        with self.lock:
            return sum(g.matching for g in self.generations)

    @property
    def late(self) -> int:
        with self.lock:
            return sum(g.late for g in self.generations)

    def _open(self, target: Path | None = None) -> None:
        if self.f is not None:
            self.f.close()
        self.f = open(target or self.path, "a")  # noqa: SIM115
        st = os.fstat(self.f.fileno())
        g = Generation(str(target or self.path), st.st_ino)
        if self.watch:
            g.watch = os.dup(self.f.fileno())
        with self.lock:
            self.generations.append(g)
        if self.first is not None and st.st_size == 0:
            self._write([self.first])

    def _write(self, lines: list[str]) -> None:
        self.f.write("".join(lines))
        self.f.flush()
        count = matching(lines)
        g = self.generations[-1]
        with self.lock:
            g.lines += len(lines)
            g.matching += count
            if os.fstat(self.f.fileno()).st_nlink == 0:
                g.late += count

    def _follow(self) -> None:
        """Reopen the path if it names another inode than the one written to."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if st.st_ino != os.fstat(self.f.fileno()).st_ino:
            self._open()

    def _between_writes(self) -> None:
        self._follow()
        if self.flag is not None and self.flag.exists():
            self._follow()
            self.flag.unlink(missing_ok=True)

    def run(self) -> None:
        start = time.monotonic()
        while not self.stop.is_set():
            due = max(int((time.monotonic() - start) * RATE), self.n + 1)
            self._write([self.fmt(i) for i in range(self.n, due)])
            self.n = due
            self._between_writes()
            time.sleep(0.005)
        self.f.close()

    def release(self) -> None:
        """Close the generations' duplicates, after the last reading (the readings that follow
        the writer's stop can still see the last generation)."""
        with self.lock:
            for g in self.generations:
                if g.watch is not None:
                    os.close(g.watch)
                    g.watch = None

    def mark_seen(self) -> None:
        """A reading begins: each generation whose inode has a name now can be seen by it."""
        self._check(seen=True)

    def note_rotation(self) -> None:
        """A rotation ended: let go of the generations it deleted."""
        self._check(seen=False)

    def _check(self, seen: bool) -> None:
        with self.lock:
            for g in self.generations:
                if g.watch is None:
                    continue
                if os.fstat(g.watch).st_nlink > 0:
                    g.seen = g.seen or seen
                else:
                    g.gone = True
                    os.close(g.watch)
                    g.watch = None


class DatedWriter(Writer):
    """An application that writes dated files and points a symlink at the current one
    (`app.log -> app-3.log`), as svlogd-style and date-rotating loggers do: it opens the next file,
    replaces the link atomically (`os.replace` of a new symlink), and writes there. The scenario
    calls `switch` between readings; each dated file is a generation."""

    def __init__(self, path: Path, fmt: Format = line, first: str | None = None,
                 flag: Path | None = None, watch: bool = False) -> None:  # fmt: skip
        self.request, self.done, self.k = threading.Event(), threading.Event(), 0
        super().__init__(path, fmt, first, flag, watch)

    def _open(self, target: Path | None = None) -> None:
        super()._open(target or self.path.resolve())

    def _between_writes(self) -> None:
        if self.request.is_set():
            self.k += 1
            target = self.path.parent / f"{self.path.stem}-{self.k}{self.path.suffix}"
            self._open(target)
            tmp = self.path.parent / f".{self.path.name}.new"
            tmp.symlink_to(target.name)
            os.replace(tmp, self.path)
            self.request.clear()
            self.done.set()

    def switch(self) -> None:
        """Make the application move to its next dated file; returns once it has."""
        self.done.clear()
        self.request.set()
        assert self.done.wait(5), "the writer did not switch files"

    def wait_for(self, lines: int) -> None:
        """Until the current file holds `lines` lines."""
        deadline = time.monotonic() + 5
        while self.generations[-1].lines < lines:
            assert time.monotonic() < deadline, "the writer stopped writing"
            time.sleep(0.005)


class HandlerWriter(threading.Thread):
    """Python's RotatingFileHandler: rolls over by itself, several times between two readings."""

    def __init__(self, path: Path, fmt: Format = line, first: str | None = None,
                 flag: Path | None = None, watch: bool = False) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.path, self.fmt, self.stop, self.n = path, fmt, threading.Event(), 0
        self.written, self.late = 0, 0
        self.generations: list[Generation] = []

    def run(self) -> None:
        handler = logging.handlers.RotatingFileHandler(self.path, maxBytes=20_000, backupCount=500)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger = logging.Logger(f"writer-{id(self)}")
        logger.addHandler(handler)
        start = time.monotonic()
        while not self.stop.is_set():
            due = max(int((time.monotonic() - start) * RATE), self.n + 1)
            lines = [self.fmt(i) for i in range(self.n, due)]
            for text in lines:
                logger.info(text.rstrip("\n"))
            self.written += matching(lines)
            self.n = due
            time.sleep(0.005)
        handler.close()

    def mark_seen(self) -> None:
        pass

    def note_rotation(self) -> None:
        pass

    def release(self) -> None:
        pass


def reopen_script(flag: Path) -> str:
    """A postrotate command: ask the writer to reopen its log, and wait (at most 5 s) until it
    has. Harmless anywhere: it only touches `flag`."""
    return (
        f"touch '{flag}'; i=0; while [ -e '{flag}' ] && [ $i -lt 1000 ]; "
        "do sleep 0.005; i=$((i+1)); done"
    )


def on_disk(folder: Path) -> int:
    """The matching complete lines in every file under `folder`, decompressed."""
    compiled = re.compile(PATTERN.encode())
    total = 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        raw = path.read_bytes()
        for magic, decompress in (
            (b"\x1f\x8b", gzip.decompress),
            (b"BZh", bz2.decompress),
            (b"\xfd7zXZ", lzma.decompress),
        ):
            if raw.startswith(magic):
                raw = decompress(raw)
        total += sum(1 for ln in raw.split(b"\n")[:-1] if compiled.search(ln))
    return total


class Rotator(threading.Thread):
    """Runs the real logrotate: at the scenario's call, or on its own every `every` seconds.
    `force`: `-f` (rotate whatever the size and time); without it logrotate decides (size, maxsize).
    `lock`: held during each run when rotations must not overlap readings (`serialise`)."""

    def __init__(
        self,
        root: Path,
        conf: Path,
        every: float,
        force: bool = True,
        lock: threading.Lock | None = None,
        after: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(daemon=True)
        self.root, self.conf, self.every, self.force, self.after = root, conf, every, force, after
        self.lock = lock
        self.stop, self.rotations, self.last = threading.Event(), 0, 0.0
        self.error: BaseException | None = None

    def rotate(self) -> None:
        args = [
            LOGROTATE,
            *(["-f"] if self.force else []),
            "-s",
            str(self.root / "logrotate.state"),
        ]
        done = subprocess.run([*args, str(self.conf)], capture_output=True, text=True)
        assert done.returncode == 0, f"logrotate failed: {done.stderr}"
        self.rotations += 1
        self.last = time.monotonic()
        self.after()

    def run(self) -> None:
        try:
            while not self.stop.wait(self.every):
                with self.lock or contextlib.nullcontext():
                    self.rotate()
        except BaseException as e:
            self.error = e


class Agent:
    """The daemon's sampling path without the scheduler: Sampler.take, then Ledger.record_sample
    with the position, in one transaction. `kill9` drops everything held in memory (open files
    included). `before_reading` runs at the start of each reading (the writer's `mark_seen`).
    `unread`: what the committed samples reported as gone unread (SPEC: stored with the sample)."""

    def __init__(self, cfg: config.Config) -> None:
        self.cfg, self.dim, self.i = cfg, cfg.dimensions[0], 0
        self.before_reading: Callable[[], None] = lambda: None
        self.unread: list[Unread] = []
        self.readings, self.kills = 0, 0
        self.start()

    def start(self) -> None:
        self.ledger = Ledger(self.cfg.state_dir)
        self.sampler = Sampler(self.cfg)

    def sample(self, commit: bool = True) -> None:
        self.i += 1
        t = T0 + self.i
        self.before_reading()
        s = self.sampler.take(self.dim, t, self.ledger.position(self.dim.name))
        self.readings += 1
        assert s.error is None or s.error.startswith("source missing"), s.error
        if commit and s.value is not None:
            self.ledger.record_sample(self.dim.name, t, s.value, 1.0, s.state, carry=True)
            self.unread.extend(getattr(s, "unread", ()))

    def kill9(self) -> None:
        self.ledger.close()
        del self.sampler
        gc.collect()  # what the process held dies with it: its open files are closed
        self.kills += 1
        self.start()

    def billed(self) -> Decimal:
        with self.ledger.transaction() as db:
            return sum(
                (p.value for p in self.ledger.points(db, self.dim.name, int(T0))), Decimal(0)
            )


@dataclass
class Outcome:
    written: int  # matching lines the writer wrote after the first reading
    on_disk: int  # matching lines on disk at the end, less those there at the first reading
    billed: Decimal
    rotations: int  # logrotate runs (a run without -f may rotate nothing)
    generations: list[Generation]
    unread: list[Unread]
    late: int  # matching lines written to an inode that had no name any more
    readings: int
    serialised: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def unseen(self) -> int:
        """Matching lines of the generations that had no name at any reading instant (only known
        when the scenario was serialised)."""
        assert self.serialised, "only a serialised scenario knows its reading instants"
        return sum(g.matching for g in self.generations if not g.seen)

    def __str__(self) -> str:
        return (
            f"billed {self.billed}, written {self.written} ({self.billed - self.written:+}), "
            f"on disk {self.on_disk}, {self.rotations} logrotate runs, "
            f"{len(self.generations)} generations, {self.readings} readings, "
            f"unread reported {[u.what for u in self.unread]}"
        )


def harness_conf(log: Path, directives: str, flag: Path) -> str:
    """One log's stanza: many copies kept, no compression unless `directives` say otherwise (the
    later directive wins), and the reopen handshake as postrotate."""
    return (
        f"{log} {{\n  rotate 500\n  missingok\n  nocompress\n{directives}\n"
        f"  postrotate\n    {reopen_script(flag)}\n  endscript\n}}\n"
    )


def run_scenario(
    tmp_path: Path,
    rotate_conf: str | None,
    extra_options: str = "",
    live: str = "logs/access.log",
    path_option: str | None = None,
    writer_cls: type[Writer] | type[HandlerWriter] = Writer,
    seconds: float = 6.0,
    interval: float = 0.25,
    prepare: Callable[[Path], None] | None = None,
    racing: float = 0.0,
    *,
    stanza: str | None = None,
    fmt: Format = line,
    first: str | None = None,
    every: float = 1.2,
    force: bool = True,
    serialise: bool = False,
    kill_then_rotate: bool = False,
    min_gap: float = 0.0,
    between: Callable[[Writer, Agent, int], None] | None = None,
    disk: tuple[str, ...] = ("logs",),
    rotations: int = 3,
) -> Outcome:
    """A writer at RATE lines/s, logrotate every `every` seconds, a reading every `interval`
    seconds, and three kill -9s (at 1.7, 3.1 and 4.4 s; the second between a reading and its
    commit). logrotate runs with `rotate_conf` directives in `harness_conf`, or `stanza` (a whole
    configuration: use `reopen_script(tmp_path / "reopen")` as its postrotate).

    `racing`: logrotate runs on its own thread every `racing` seconds, so that rotations land in
    the middle of readings; otherwise it runs between two readings. `serialise` (with `racing`):
    rotations and readings never overlap, each kill is preceded by a committed reading, and the
    restarted agent reads before any rotation, so the harness knows which generations each reading
    could see (`Outcome.unseen`). `kill_then_rotate`: each kill is followed by a rotation before the
    restarted agent's first reading (at least `min_gap` s after the previous one: `dateext` with
    `%s` refuses two rotations in one second). `between(writer, agent, i)` runs before reading i
    (a DatedWriter's switches). The run lasts `seconds`, and on past them (up to 5 times as
    long) until logrotate has run `rotations` times: a busy machine reads and rotates less often
    in the same seconds."""
    logs = tmp_path / "logs"
    logs.mkdir()
    if prepare:
        prepare(tmp_path)
    log = tmp_path / live
    log.write_text((first or "") + fmt(-1) + fmt(-2))  # there at the first reading: not billed
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(
        f"product_code: {PRODUCT}\nstate_dir: {tmp_path / 'state'}\n"
        "dimensions:\n  - name: api_requests\n"
        f"    collector: {{type: log, path: '{path_option or log}', pattern: '{PATTERN}'"
        f"{extra_options}}}\n"
    )
    flag = tmp_path / "reopen"
    writer = writer_cls(log, fmt=fmt, first=first, flag=flag, watch=serialise)
    agent = Agent(config.load(cfg_file))
    agent.before_reading = writer.mark_seen
    agent.sample()
    skipped = sum(on_disk(tmp_path / d) for d in disk)
    conf = tmp_path / "logrotate.conf"
    if stanza is not None:
        conf.write_text(stanza)
    elif rotate_conf is not None:
        conf.write_text(harness_conf(log, rotate_conf, flag))
    lock = threading.Lock()
    rotator = Rotator(
        tmp_path, conf, racing, force, lock if serialise else None, writer.note_rotation
    )
    rotates = stanza is not None or rotate_conf is not None
    writer.start()
    if racing:
        rotator.start()

    def rotate_now() -> None:
        wait = rotator.last + min_gap - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        rotator.rotate()

    start = time.monotonic()
    next_rotation, kills = start + 1.0, [1.7, 3.1, 4.4]
    try:
        while (elapsed := time.monotonic() - start) < seconds or (
            rotates and rotator.rotations < rotations and elapsed < 5 * seconds
        ):
            time.sleep(interval)
            with lock:
                now = time.monotonic() - start
                if kills and now >= kills[0]:
                    kills.pop(0)
                    if serialise:
                        agent.sample()  # what the restart must see is what this reading saw
                    if len(kills) == 1:
                        agent.sample(commit=False)  # read, then die before the commit
                    agent.kill9()
                    if kill_then_rotate and rotates:
                        rotate_now()
                        next_rotation = time.monotonic() + every
                if rotates and not racing and time.monotonic() >= next_rotation:
                    rotate_now()
                    next_rotation = time.monotonic() + every
                if between is not None:
                    between(writer, agent, agent.i)  # type: ignore[arg-type]
                agent.sample()
    finally:
        rotator.stop.set()
        if racing:
            rotator.join()
        writer.stop.set()
        writer.join()
    if rotator.error is not None:
        raise rotator.error
    for _ in range(2):
        agent.sample()
    writer.release()
    return Outcome(
        written=writer.written,
        on_disk=sum(on_disk(tmp_path / d) for d in disk) - skipped,
        billed=agent.billed(),
        rotations=rotator.rotations,
        generations=list(writer.generations),
        unread=agent.unread,
        late=writer.late,
        readings=agent.readings,
        serialised=serialise,
    )


def assert_billed_as_written(
    o: Outcome, min_rotations: int = 3, kept: bool = True, quiet: bool = True
) -> None:
    """The scenario's premises, then billed == lines written. `kept`: logrotate deleted nothing,
    so every line written is on disk too. `quiet`: nothing went unread, so nothing may be
    reported as unread (a false report makes health not ok)."""
    assert o.rotations >= min_rotations, o
    assert o.written > 3000, o  # the writer really wrote
    assert o.late == 0, f"premise: lines written to a deleted inode; {o}"
    if kept:
        assert o.on_disk == o.written, f"premise: logrotate lost or deleted lines; {o}"
    assert o.billed == o.written, o
    if quiet:
        assert o.unread == [], o


def assert_billed_as_on_disk(o: Outcome, min_rotations: int = 3) -> None:
    """copytruncate: logrotate loses what is written between its copy and its truncate, so what
    is on disk is the oracle (SPEC), and it can only be less than what was written."""
    assert o.rotations >= min_rotations, o
    assert o.on_disk > 3000, o
    assert o.on_disk <= o.written, o
    assert o.billed == o.on_disk, f"{o}; expected {o.on_disk} (on disk)"
