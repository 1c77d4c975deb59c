"""Files in state_dir stay usable by the service user, whoever ran a command first.

A `send --flush` or `run` started by root would leave a root-owned `send.lock`, ledger or WAL that
the service user (`metering-agent`) can no longer open. So: running as root, every file the agent
creates in state_dir is given the directory's owner; running as another user who does not own the
directory, a writing command refuses with one line saying whom to run it as. One exception: a
Kubernetes emptyDir under `fsGroup` belongs to root with the pod's group and mode 2777; a non-root
process of that group may write there (every container of the pod runs with that group, and the
setgid bit gives each new file the same group), so it is accepted.
"""

from __future__ import annotations

import contextlib
import os
import pwd
from pathlib import Path

from agent.errors import NotAuthorized

SERVICE_USER = "metering-agent"


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def check_writer(state_dir: Path, command: str) -> None:
    """Refuse a writing command by a user who is neither root nor the state dir's owner."""
    try:
        st = os.stat(state_dir)
    except PermissionError:
        st = None
    except OSError:
        return  # missing: created by this command, with this user as its owner (or its error)
    euid = os.geteuid()
    if st is not None and euid in (0, st.st_uid):
        return
    if st is not None and _group_writer(state_dir, st.st_gid):
        return
    user = _owner_name(st.st_uid) if st is not None else SERVICE_USER
    raise NotAuthorized(
        f"state_dir {state_dir} belongs to user {user}: run this as that user, so the ledger "
        f"and locks stay usable by the service (sudo -u {user} metering-agent {command})"
    )


def _group_writer(state_dir: Path, gid: int) -> bool:
    """True for a process of the directory's group that may write it (the fsGroup emptyDir)."""
    if not os.access(state_dir, os.W_OK):
        return False
    return gid == os.getegid() or gid in os.getgroups()


def adopt(state_dir: Path, *paths: Path) -> None:
    """Running as root, give files created in state_dir the directory's owner."""
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(state_dir)
    except OSError:
        return
    if st.st_uid == 0 and st.st_gid == 0:
        return
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            info = os.lstat(path)
            if (info.st_uid, info.st_gid) != (st.st_uid, st.st_gid):
                os.lchown(path, st.st_uid, st.st_gid)


def unreadable(state_dir: Path, command: str) -> NotAuthorized:
    """The one line for a read-only command that may not look into state_dir."""
    return NotAuthorized(
        f"cannot read {state_dir}: permission denied; use sudo, or run it as the "
        f"{SERVICE_USER} user (sudo -u {SERVICE_USER} metering-agent {command})"
    )
