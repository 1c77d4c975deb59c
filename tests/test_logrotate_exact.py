"""Issue 21: the log collector exact against the real tools, as sellers configure them.

Each scenario drives Debian's `logrotate` (or a date-rotating application) against a writer at
~2,000 lines/s and the agent's real sampling and ledger path, with three kill -9s (one between a
reading and its commit; see `run_scenario`). The oracle is the writer's count of the matching
lines it wrote (tests/rotation.py); the only exception SPEC allows here, generations created and
deleted between two readings (`rotate 0`), is computed from the run's own timeline.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
from pathlib import Path
from typing import Any

import pytest

from agent.ledger import Ledger
from tests.rotation import (
    HEALTH_CHECK,
    LOGROTATE,
    Agent,
    DatedWriter,
    Writer,
    assert_billed_as_written,
    combined,
    nginx_json,
    reopen_script,
    run_scenario,
)

pytestmark = [
    pytest.mark.skipif(
        not os.access(LOGROTATE, os.X_OK),
        reason=f"{LOGROTATE} is not installed (apt-get install logrotate)",
    ),
    pytest.mark.e2e,  # 6 to 8 s each
]


def _owner() -> tuple[str, str]:
    """Debian's `www-data adm` where they exist (they do on Debian), else this process's own."""
    try:
        pwd.getpwnam("www-data")
        grp.getgrnam("adm")
        return "www-data", "adm"
    except KeyError:
        return pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name


def nginx_stanza(root: Path, rotate: int = 14, delaycompress: bool = True) -> str:
    """/etc/logrotate.d/nginx from Debian 12's nginx-common 1.22.1-9+deb12u9, verbatim (tabs
    included) except: the path (`/var/log/nginx/*.log`), the user and group if `www-data`/`adm` do
    not exist, the prerotate's folder (`/etc/logrotate.d/httpd-prerotate`, which must not run a
    real script here), and the postrotate: `invoke-rc.d nginx rotate` (nginx reopens its logs)
    becomes the writer's reopen. `rotate` and `delaycompress` let scenario 2 vary it."""
    user, group = _owner()
    return (
        f"{root / 'logs'}/*.log {{\n"
        "\tdaily\n"
        "\tmissingok\n"
        f"\trotate {rotate}\n"
        "\tcompress\n" + ("\tdelaycompress\n" if delaycompress else "") + "\tnotifempty\n"
        f"\tcreate 0640 {user} {group}\n"
        "\tsharedscripts\n"
        "\tprerotate\n"
        f"\t\tif [ -d {root / 'httpd-prerotate'} ]; then \\\n"
        f"\t\t\trun-parts {root / 'httpd-prerotate'}; \\\n"
        "\t\tfi \\\n"
        "\tendscript\n"
        "\tpostrotate\n"
        f"\t\t{reopen_script(root / 'reopen')} >/dev/null 2>&1\n"
        "\tendscript\n"
        "}\n"
    )


def test_debian_nginx_stanza_with_json_lines_that_all_begin_alike(tmp_path: Path) -> None:
    """1. Debian's nginx stanza (daily, rotate 14, compress, delaycompress, create 0640, shared
    scripts) forced about every second, nginx `escape=json` lines whose first 229 bytes are the
    same in every line, file and copy; each kill is followed by a rotation before the restart.
    On ext4 the `create`d access.log often gets the inode number of the plain copy that gzip has
    just deleted (seen: 8 generations on 5 inode numbers), so this is also inode reuse under
    identical prefixes, whenever the filesystem happens to do it."""
    outcome = run_scenario(
        tmp_path,
        None,
        stanza=nginx_stanza(tmp_path),
        fmt=nginx_json,
        every=1.0,
        kill_then_rotate=True,
        rotations=6,
    )
    assert sorted(p.name for p in (tmp_path / "logs").iterdir())[:3] == [
        "access.log",
        "access.log.1",
        "access.log.2.gz",
    ]
    assert_billed_as_written(outcome, min_rotations=6)


def test_json_lines_rotate_2_compress_without_delaycompress(tmp_path: Path) -> None:
    """2. The same writer; `rotate 2`, `compress` without `delaycompress`: each rotated file is
    compressed at once (its plain inode deleted) and deleted three rotations later, long after
    the readings that finish it (logrotate deleted copies: on disk < written)."""
    outcome = run_scenario(
        tmp_path,
        None,
        stanza=nginx_stanza(tmp_path, rotate=2, delaycompress=False),
        fmt=nginx_json,
        every=1.0,
        kill_then_rotate=True,
        rotations=6,
    )
    assert outcome.on_disk < outcome.written  # rotate 2 deleted the oldest copies
    assert_billed_as_written(outcome, min_rotations=6, kept=False)


def test_size_driven_rotation_with_the_same_first_line_in_every_file(tmp_path: Path) -> None:
    """3. logrotate without -f every 0.5 s, rotating by `maxsize` (the file grows ~190 KB/s),
    combined-format lines, and every new file begins with the same 150-byte line."""
    directives = "  daily\n  maxsize 100k\n  create\n  compress\n  delaycompress\n  notifempty"
    outcome = run_scenario(
        tmp_path,
        directives,
        fmt=combined,
        first=HEALTH_CHECK,
        every=0.5,
        force=False,
        rotations=8,
    )
    assert len(outcome.generations) >= 8  # logrotate did rotate, by size
    heads = {
        p.read_bytes()[:150]
        for p in (tmp_path / "logs").iterdir()
        if p.is_file() and not p.name.endswith(".gz")
    }
    assert heads == {HEALTH_CHECK.encode()[:150]}
    assert_billed_as_written(outcome, min_rotations=8)


DATEEXT = (
    "  create\n  dateext\n  dateformat -%Y%m%d-%s\n  extension .log\n  compress\n  delaycompress"
)


def test_dateext_with_extension_and_rotated(tmp_path: Path) -> None:
    """4a. `dateext`, `dateformat -%Y%m%d-%s`, `extension .log`: copies are named
    `access-20261206-1796532200.log` (then `.log.gz`), which neither `access.log.*` nor
    `access.log-*` matches; `rotated` names them. Each kill is followed by a rotation."""
    logs = tmp_path / "logs"
    outcome = run_scenario(
        tmp_path,
        DATEEXT,
        extra_options=f", rotated: '{logs}/access-*.log*'",
        kill_then_rotate=True,
        min_gap=1.05,  # %s: two rotations in one second would name the same copy (exit 1)
        rotations=4,
    )
    assert any(p.name.startswith("access-") and p.name.endswith(".log") for p in logs.iterdir())
    assert_billed_as_written(outcome, min_rotations=4)


def test_dateext_with_extension_and_no_rotated_bills_exactly_or_reports(tmp_path: Path) -> None:
    """4b. The same without `rotated`: copies the collector cannot see by their names. It must bill
    every line, or report the usage it could not read with a fix naming `rotated` (SPEC: logged,
    counted in status, health not ok). Never more than was written."""
    outcome = run_scenario(tmp_path, DATEEXT, kill_then_rotate=True, min_gap=1.05)
    assert outcome.rotations >= 4 and outcome.written > 3000 and outcome.late == 0
    assert outcome.on_disk == outcome.written, f"premise: logrotate lost lines; {outcome}"
    assert outcome.billed <= outcome.written, outcome
    if outcome.billed != outcome.written:
        assert any("rotated" in u.fix for u in outcome.unread), (
            f"{outcome.written - outcome.billed} lines went unbilled and nothing was reported "
            f"with a fix naming `rotated`; {outcome}"
        )


def test_symlink_switched_atomically_to_dated_files(tmp_path: Path) -> None:
    """5. `app.log -> app-<n>.log`, the link replaced with `os.replace` of a new symlink (as
    svlogd-style and date-rotating applications do) about every second and while the agent is
    dead after each kill (the restarted agent must finish the target it was reading), and once
    twice between two readings, so that one dated file is the target at no reading; no
    `rotated`."""
    short_lived: list[int] = []
    kills = [0]

    def make_first(root: Path) -> None:
        (root / "logs" / "app-0.log").touch()
        (root / "logs" / "app.log").symlink_to("app-0.log")

    def switch(writer: Writer, agent: Agent, i: int) -> None:
        assert isinstance(writer, DatedWriter)
        if not short_lived and i >= 10:  # app-<k> is the target between two readings only
            writer.switch()
            writer.wait_for(200)
            short_lived.append(writer.k)
            writer.switch()
        elif i % 4 == 0 or agent.kills != kills[0]:  # every 4th reading, and after a kill
            writer.switch()
        kills[0] = agent.kills

    outcome = run_scenario(
        tmp_path,
        None,
        live="logs/app.log",
        writer_cls=DatedWriter,
        prepare=make_first,
        between=switch,
    )
    assert len(outcome.generations) >= 6 and short_lived
    assert outcome.generations[short_lived[0]].matching >= 100
    assert_billed_as_written(outcome, min_rotations=0)


def test_rotate_0_faster_than_the_readings(tmp_path: Path) -> None:
    """6. `rotate 0` (logrotate renames, creates, runs postrotate, then deletes the rotated file)
    every 0.3 s, a reading every second. SPEC allows missing only a generation created and deleted
    entirely between two readings, so the oracle is the lines written less those of generations
    that had no name at any reading instant.

    How the harness knows (see `run_scenario(serialise=True)` and `Writer.mark_seen`): rotations
    and readings hold one lock, so each reading sees the files as one instant; the writer keeps a
    duplicate descriptor of each generation (the inode its lines went to) and, as each reading
    begins, a generation whose inode still has a name (st_nlink > 0) is `seen`. A generation seen is
    owed in full: the collector holds what it reads open, so it finishes a deleted one, and the
    writer stops writing to it inside the postrotate that precedes the deletion (so nothing is
    written after the collector's last look). A kill never loses one: it is preceded by a committed
    reading and the restarted agent reads before logrotate can run again."""
    outcome = run_scenario(
        tmp_path,
        "  create\n  rotate 0",
        racing=0.3,
        interval=1.0,
        seconds=7.5,
        serialise=True,
    )
    seen = [g for g in outcome.generations if g.seen]
    unseen = [g for g in outcome.generations if not g.seen]
    assert outcome.rotations >= 15 and len(seen) >= 6 and len(unseen) >= 6, outcome
    assert all(g.gone for g in outcome.generations[:-1])  # logrotate deleted every one but the last
    assert outcome.late == 0, outcome
    expected = outcome.written - outcome.unseen
    assert expected > 1500, outcome
    assert outcome.billed == expected, (
        f"{outcome}; expected {expected}: written less {outcome.unseen} in {len(unseen)} "
        "generations that no reading could see"
    )


def _entries(value: Any) -> int:
    """The length of the largest list or mapping in a saved state: whatever the collector keeps
    per file, stream or copy."""
    if isinstance(value, dict):
        return max([len(value), *(_entries(v) for v in value.values())])
    if isinstance(value, list):
        return max([len(value), *(_entries(v) for v in value)])
    return 0


def test_state_stays_bounded_with_30_compressed_copies(tmp_path: Path) -> None:
    """8. `rotate 30`, `compress`, a rotation before nearly every reading, until logrotate has
    deleted copies for a while: the saved position has no more entries than there are files on
    disk (plus a few for files just deleted), however many rotations there were; and every line
    was billed."""
    outcome = run_scenario(
        tmp_path,
        "  create\n  compress\n  rotate 30",
        interval=0.1,
        every=0.1,
        seconds=7.0,
        rotations=40,
    )
    files = list((tmp_path / "logs").iterdir())
    assert len([p for p in files if p.name.endswith(".gz")]) == 30
    assert outcome.rotations >= 40, outcome  # logrotate has been deleting copies
    ledger = Ledger(tmp_path / "state")
    try:
        state = ledger.position("api_requests")
    finally:
        ledger.close()
    assert state is not None
    assert _entries(state) <= len(files) + 4, json.dumps(state)[:2000]
    assert len(json.dumps(state)) <= 1024 * len(files)
    assert_billed_as_written(outcome, min_rotations=40, kept=False)
