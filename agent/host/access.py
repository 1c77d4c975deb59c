"""Can the service read the seller's logs? `check` run as root answers for the service's user.

Root reads every file, so a `check` run by the seller as root passes while the service, running as
`metering-agent` with the unit's sandbox, cannot open the log and bills nothing. This module judges
a path as that user would meet it: the unit's `ProtectHome=yes` and `PrivateTmp=yes` hide whole
trees, then the mode bits of the file and of every folder above it decide (owner, group, other;
the unit adds the `adm` group with `SupplementaryGroups=`). POSIX ACLs are not read: a path they
open is reported as unreadable, which a seller can check with `sudo -u metering-agent cat PATH`.
"""

from __future__ import annotations

import glob
import grp
import os
import pwd
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

SERVICE_USER = "metering-agent"
UNIT_GROUPS = ("adm",)  # the unit's SupplementaryGroups=

# What the unit's sandbox hides from the service, and why (packaging/metering-agent.service).
HIDDEN = (
    (("/home", "/root", "/run/user"), "the unit's ProtectHome=yes hides it from the service"),
    (("/tmp", "/var/tmp"), "the unit's PrivateTmp=yes gives the service its own empty /tmp"),
)


@dataclass(frozen=True)
class Account:
    """Who the service runs as: its uid and every gid it holds."""

    name: str
    uid: int
    gids: frozenset[int]


def service_account(
    name: str = SERVICE_USER, groups: Iterable[str] = UNIT_GROUPS
) -> Account | None:
    """The service user's ids, or None where the user does not exist (not installed yet)."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    gids = {pw.pw_gid}
    for g in grp.getgrall():
        if name in g.gr_mem:
            gids.add(g.gr_gid)
    for group in groups:
        try:
            gids.add(grp.getgrnam(group).gr_gid)
        except KeyError:
            continue
    return Account(name, pw.pw_uid, frozenset(gids))


def _allows(st: os.stat_result, who: Account, bits: int) -> bool:
    """Mode bits as the kernel applies them: the owner class, else the group class, else other."""
    mode = st.st_mode
    if st.st_uid == who.uid:
        return (mode >> 6) & bits == bits
    if st.st_gid in who.gids:
        return (mode >> 3) & bits == bits
    return mode & bits == bits


def _describe(path: str, st: os.stat_result) -> str:
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{path} ({owner}:{group} {stat.S_IMODE(st.st_mode):04o})"


def hidden_by_sandbox(path: str) -> str | None:
    p = PurePosixPath(path)
    for roots, why in HIDDEN:
        if any(p == PurePosixPath(r) or PurePosixPath(r) in p.parents for r in roots):
            return why
    return None


def path_problem(
    path: str,
    who: Account,
    list_folder: bool = True,
    stat_fn: Callable[[str], os.stat_result] = os.stat,
    sandboxed: bool = True,
) -> str | None:
    """Why `who` cannot read `path` (a file, or a folder a file will appear in), or None.

    Every folder above it must be searchable (x); the file readable (r); and, because the log
    collector looks for rotated copies beside the file, its folder listable (r) too."""
    why = hidden_by_sandbox(path) if sandboxed else None
    if why:
        return f"{path}: {why}; log somewhere else (e.g. /var/log/<product>/)"
    p = PurePosixPath(os.path.abspath(path))
    for folder in reversed(p.parents):
        try:
            st = stat_fn(str(folder))
        except OSError:
            return None  # not there (yet): nothing to judge
        if not _allows(st, who, 0o1):
            return (
                f"the {who.name} user cannot enter {_describe(str(folder), st)}; "
                "let group adm enter it (chgrp adm, chmod g+x)"
            )
    try:
        st = stat_fn(str(p))
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode):
        if not _allows(st, who, 0o5):
            return (
                f"the {who.name} user cannot list {_describe(str(p), st)}; "
                "let group adm list it (chgrp adm, chmod g+rx)"
            )
        return None
    if not _allows(st, who, 0o4):
        return (
            f"the {who.name} user cannot read {_describe(str(p), st)}; make it readable by "
            "group adm (chgrp adm, chmod g+r; logrotate: create 0640 <owner> adm)"
        )
    if list_folder:
        parent = str(p.parent)
        pst = stat_fn(parent)
        if not _allows(pst, who, 0o5):
            return (
                f"the {who.name} user cannot list {_describe(parent, pst)} to find rotated "
                "copies; let group adm list it (chgrp adm, chmod g+rx)"
            )
    return None


def log_problems(
    pattern: str, rotated: str | None, who: Account, sandboxed: bool = True
) -> list[str]:
    """Every problem the service would meet reading a `log` collector's files and copies."""
    paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    targets = [p for p in paths if os.path.exists(p)]
    if not targets and not glob.has_magic(os.path.dirname(pattern)):
        targets = [os.path.dirname(pattern)]  # the file may appear later: its folder must open
    if rotated:
        copies = sorted(glob.glob(rotated))[:1]
        folder = os.path.dirname(rotated)
        targets += copies or ([] if glob.has_magic(folder) else [folder])
    problems: list[str] = []
    for path in targets:
        problem = path_problem(os.path.realpath(path), who, sandboxed=sandboxed)
        if problem and problem not in problems:
            problems.append(problem)
    return problems


def sandbox_problems(pattern: str, rotated: str | None) -> list[str]:
    """The paths the unit's sandbox hides whoever the service runs as: what `check` can still say
    where the service user does not exist yet (the package is not installed)."""
    problems = []
    for path in (pattern, rotated):
        why = hidden_by_sandbox(os.path.realpath(path)) if path else None
        if why:
            problems.append(f"{path}: {why}; log somewhere else (e.g. /var/log/<product>/)")
    return problems
