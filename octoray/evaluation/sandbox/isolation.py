"""How the sandbox isolates a sample: the namespaces (``unshare`` arguments, the setup script and
its mount table, the paths kept visible, the isolation this machine allows, probed once), the
sample's uid, and how its process tree is waited for and killed (the group, then anything left
running under its uid).
"""

from __future__ import annotations

import functools
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from octoray.evaluation.sandbox.toolchains import NODE_MODULES, rust_sysroot

log = logging.getLogger(__name__)

# Inside the namespaces the cache dir is bound here (a tmpfs over /mnt holds the mount point).
SANDBOX_ROOT = "/mnt/sbx"
HIDDEN_DIRS = ("/root", "/home")
PRIVATE_TMP = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
UID_BASE = 1_100_000  # sandbox uids: UID_BASE + pid % UID_SPAN, no /etc/passwd entry needed
UID_SPAN = 100_000
READY = ".ready-"  # marker the namespace setup writes (as root) right before starting a sample

# Runs as root (or as mapped root in a user namespace) in the new namespaces, then starts the
# sample as a child -- not via exec: a credential change would clear the parent-death signal
# that `unshare --kill-child` relies on to tear the PID namespace down. The mounts are one
# `mount --all` over a table (see mount_table) written to a fresh tmpfs no sample can write
# to: one process instead of one per mount, a third of a sample's sandbox overhead.
SETUP_SH = r"""
set -eu
table=$1; work=$2; uid=$3; shift 3
mount -t tmpfs -o size=1m,mode=755 octoray-sandbox /mnt
printf '%s\n' "$table" > /mnt/fstab
mount --all --fstab /mnt/fstab
cd "/mnt/sbx/work/$work"
: > "/mnt/sbx/work/.ready-$work"
if [ -n "$uid" ]; then
  setpriv --reuid="$uid" --regid="$uid" --clear-groups --no-new-privs -- "$@"
else
  "$@"
fi
"""


def mount_table(sandbox_dir: str) -> str:
    """The fstab the setup mounts, in order: ``sandbox_dir`` at /mnt/sbx; each toolchain dir
    under a hidden home dir or a temporary dir set aside under /mnt/keep; empty tmpfs over the
    home dirs and fresh tmpfs over the temporary dirs; the set-aside toolchain dirs back in place
    (a checkout in /home or /tmp keeps its virtualenv and node_modules). Mount points are created
    as needed (``X-mount.mkdir``)."""
    keep = _keep_paths()
    rows = [(sandbox_dir, SANDBOX_ROOT, "none", "bind,X-mount.mkdir")]
    rows += [(path, f"/mnt/keep/{i}", "none", "bind,X-mount.mkdir") for i, path in enumerate(keep)]
    rows += [("octoray-sandbox", d, "tmpfs", "size=1m,mode=755") for d in HIDDEN_DIRS if os.path.isdir(d)]
    rows += [("octoray-sandbox", d, "tmpfs", "size=64m,mode=1777") for d in PRIVATE_TMP if os.path.isdir(d)]
    rows += [(f"/mnt/keep/{i}", path, "none", "bind,X-mount.mkdir") for i, path in enumerate(keep)]
    return "\n".join(f"{_fstab_field(source)} {_fstab_field(target)} {kind} {options} 0 0"
                     for source, target, kind, options in rows)


def _fstab_field(path: str) -> str:
    """``path`` with fstab's octal escapes for the characters that would split or end a field."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def wait_for_exit(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until ``proc`` exits (True) or ``timeout`` seconds pass (False), waking the moment
    it exits: ``Popen.wait(timeout=)`` polls with sleeps that double up to 50 ms, which added
    ~30 ms of idle latency to every sample (half of a JavaScript sample's time). A pidfd
    (Linux >= 5.3) becomes readable when the process exits; without one, Popen's polling."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd support, or the process is already reaped
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(max(0.0, timeout) * 1000):
            return proc.poll() is not None
        proc.wait()  # reap it; returns at once
        return True
    finally:
        os.close(pidfd)


def kill_group(proc: subprocess.Popen) -> None:
    """Terminate, then kill, the sample's whole session, and wait until it is gone. With PID
    namespaces the death of the namespace's init kills every descendant, setsid'd ones
    included; the init only finishes exiting once all of them are dead, so we wait for that."""
    inits = _children(proc.pid)
    for sig, grace in ((signal.SIGTERM, 0.2), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    if proc.returncode is None:
        log.warning("sandbox: process %d did not die after SIGKILL", proc.pid)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in inits) and time.monotonic() < deadline:
        time.sleep(0.02)


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie init has reaped its namespace)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def unshare_argv(is_root: bool, allow_network: bool) -> list[str]:
    argv = ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--propagation", "private",
            "--mount-proc"]
    if not allow_network:
        argv.append("--net")
    if not is_root:
        argv[1:1] = ["--user", "--map-root-user"]
    return argv


_ISOLATION: dict[tuple[bool, bool], str] = {}


def isolation_mode(is_root: bool, allow_network: bool) -> str:
    """"namespaces" when unshare works here, else "none" (logged once per process)."""
    key = (is_root, allow_network)
    if key not in _ISOLATION:
        mode, why = "none", "unshare not found"
        if shutil.which("unshare") and (not is_root or shutil.which("setpriv")):
            with tempfile.TemporaryDirectory() as tmp:
                os.chmod(tmp, 0o755)
                (Path(tmp) / "work" / "probe").mkdir(parents=True)
                probe = subprocess.run(
                    [*unshare_argv(is_root, allow_network), "/bin/sh", "-c", SETUP_SH,
                     "octoray-sandbox", mount_table(tmp), "probe", str(UID_BASE) if is_root else "",
                     "/bin/true"],
                    capture_output=True, text=True, timeout=30)
                if probe.returncode == 0:
                    mode = "namespaces"
                else:
                    why = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["?"]
                    why = why[0]
        if mode == "none":
            log.warning("sandbox: no namespace isolation (%s); samples run with rlimits, a new "
                        "session%s and no network/PID/mount isolation", why,
                        " and an unprivileged uid" if is_root else "")
        _ISOLATION[key] = mode
    return _ISOLATION[key]


@functools.lru_cache(maxsize=1)
def _keep_paths() -> tuple[str, ...]:
    """Toolchain directories under hidden home dirs or private temporary dirs that samples still
    need (pyenv, rustup, a virtualenv or node_modules in a checkout under /home or /tmp); worked
    out once per process."""
    wanted = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent,
              NODE_MODULES}
    # Library dirs a .pth file chains in from elsewhere (a virtualenv layered on another).
    wanted |= {Path(entry) for entry in sys.path if entry.endswith(("site-packages", "dist-packages"))}
    sysroot = rust_sysroot()
    if sysroot:
        wanted.add(Path(sysroot))
    out = set()
    for path in wanted:
        path = path.resolve()
        if path.is_dir() and any(str(path).startswith(h + "/") for h in (*HIDDEN_DIRS, *PRIVATE_TMP)):
            out.add(str(path))
    # A directory inside another kept one comes along with it.
    return tuple(sorted(p for p in out if not any(p.startswith(q + "/") for q in out)))


def tasks_of_uid(uid: int) -> int:
    """Threads already running under ``uid`` (RLIMIT_NPROC counts them all)."""
    count = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue
    return count
