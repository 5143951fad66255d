"""The execution sandbox: the only place in octoray that runs untrusted (model-generated) code.

This module, with its two helpers for the accelerated builds -- ``java_compiler`` (the warm
javac it starts inside the sandbox) and ``go_direct`` (the Go build steps it runs inside the
sandbox) -- is all of it; nothing else in octoray starts a sample's code or its compiler.

Each sample runs as its own subprocess tree in a fresh directory, under per-language wall-clock
timeouts and rlimits, and -- where the machine allows it (util-linux ``unshare``; detected once
per process) -- inside new network, PID and mount namespaces:

* network: a fresh network namespace has only a downed loopback device, so no socket reaches
  anything (not even a listener on this machine's 127.0.0.1);
* processes: the sample is a child of a root-owned ``sh`` that is PID 1 of a new PID namespace;
  killing the outer process on timeout makes the kernel SIGKILL everything left in the
  namespace, including grandchildren that called ``setsid`` or daemonized, and a sample cannot
  see or signal any process outside it;
* files: /tmp, /var/tmp, /dev/shm and /run/lock are fresh tmpfs, home directories (/root,
  /home) are hidden behind empty tmpfs with only the toolchains bind-mounted back, the cache
  directory appears at ``/mnt/sbx``; cwd and HOME are the sample's own directory;
* user: when we run as root the sample runs as an unprivileged uid (``setpriv``), unique per
  Sandbox process, so RLIMIT_NPROC applies (root ignores it) and the only writable places are
  its own directory, its process's compile caches and the private tmpfs mounts.

Without ``unshare`` it falls back (logged warning) to a plain subprocess in a new session with
the same rlimits and uid drop; see docs/execution.md for exactly what is and is not enforced.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import resource
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from octoray.evaluation.sandbox import go_direct

from octoray.evaluation.sandbox import java_compiler
from octoray.evaluation.humanevalpack import LANGUAGES
from octoray.evaluation.sandbox.programs import CPP_HEADER, build_program
from octoray.evaluation.sandbox.shared_builds import build_lock, key_of

log = logging.getLogger(__name__)

Status = Literal["pass", "fail", "timeout", "error"]

# Wall-clock seconds per sample, compile + run. Source: bigcode-evaluation-harness
# tasks/humanevalpack.py LANGUAGE_TO_TIMEOUT (rust's 300 s covers cargo's first compile of the
# dependencies there; here the dependencies are prebuilt once, outside the per-sample budget).
TIMEOUTS_S: dict[str, float] = {"python": 10, "js": 10, "java": 10, "go": 20, "cpp": 60,
                                "rust": 300}

TAIL_CHARS = 2000
# Versions the Debian packages provide offline. The reference used rand 0.7, whose
# gen_range(a, b) takes two arguments; rand 0.8 takes a range, so the canonical solutions of
# Rust/32 and Rust/50 do not compile here (documented exception in docs/execution.md).
RUST_DEPS = {"rand": "0.8", "regex": "1", "md5": "0.7"}
# Where Debian's librust-*-dev packages put the crates; OCTORAY_CARGO_REGISTRY points elsewhere
# (another offline directory source).
DEBIAN_CARGO_REGISTRY = Path(os.environ.get("OCTORAY_CARGO_REGISTRY", "/usr/share/cargo/registry"))
# regex's default features (aho-corasick, memchr) are a package of their own, only a Recommends.
RUST_PACKAGES = "librust-rand-dev librust-regex-dev 'librust-regex+default-dev' librust-md5-dev"
GOPATH = "/usr/share/gocode"  # golang-github-stretchr-testify-dev installs testify here
REPO_ROOT = Path(__file__).resolve().parents[3]
NODE_MODULES = REPO_ROOT / ".toolchains" / "node_modules"  # js-md5, scripts/install_toolchains.sh

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
# `mount --all` over a table (see _mount_table) written to a fresh tmpfs no sample can write
# to: one process instead of one per mount, a third of a sample's sandbox overhead.
_SETUP_SH = r"""
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


def _mount_table(sandbox_dir: str) -> str:
    """The fstab the setup mounts, in order: ``sandbox_dir`` at /mnt/sbx; each toolchain dir
    under a hidden home dir set aside under /mnt/keep; empty tmpfs over the home dirs; the
    set-aside toolchain dirs back in place; fresh tmpfs over the temporary dirs. Mount points
    are created as needed (``X-mount.mkdir``)."""
    keep = _keep_paths()
    rows = [(sandbox_dir, SANDBOX_ROOT, "none", "bind,X-mount.mkdir")]
    rows += [(path, f"/mnt/keep/{i}", "none", "bind,X-mount.mkdir") for i, path in enumerate(keep)]
    rows += [("octoray-sandbox", d, "tmpfs", "size=1m,mode=755") for d in HIDDEN_DIRS if os.path.isdir(d)]
    rows += [(f"/mnt/keep/{i}", path, "none", "bind,X-mount.mkdir") for i, path in enumerate(keep)]
    rows += [("octoray-sandbox", d, "tmpfs", "size=64m,mode=1777") for d in PRIVATE_TMP if os.path.isdir(d)]
    return "\n".join(f"{_fstab_field(source)} {_fstab_field(target)} {kind} {options} 0 0"
                     for source, target, kind, options in rows)


def _fstab_field(path: str) -> str:
    """``path`` with fstab's octal escapes for the characters that would split or end a field."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one sample. ``error`` means a harness/toolchain problem, not the sample's."""

    status: Status
    stderr_tail: str  # last ~2000 chars of stdout+stderr
    duration_s: float


@dataclass(frozen=True)
class Limits:
    """Resource limits applied to every process of a sample (util-linux ``prlimit`` wrapping
    the child; ``setrlimit`` in ``preexec_fn`` only where prlimit is missing)."""

    memory_mb: int = 4096  # RLIMIT_AS per process; the JVM is sized to fit (-Xmx, -Xss)
    max_processes: int = 512  # RLIMIT_NPROC: processes+threads of the sample's uid
    max_file_mb: int = 512  # RLIMIT_FSIZE: largest file a sample may write (binaries included)
    max_open_files: int = 1024  # RLIMIT_NOFILE
    timeout_scale: float = 1.0  # multiplies TIMEOUTS_S (slow or heavily shared machines)
    # Worker threads a sample's runtime may size itself for (numpy's OpenBLAS pool, Go's
    # GOMAXPROCS, the JVM's view of the CPU count). An execution actor reserves one CPU; a
    # sample that fans out over every core (the reference harness imports numpy into every
    # Python program, and OpenBLAS starts one spinning thread per core) would oversubscribe a
    # node running one actor per CPU.
    threads: int = 1


class Sandbox:
    """Runs HumanEvalPack programs in isolation; safe to share ``cache_dir`` between processes.

    ``cache_dir`` holds the sample directories (``work/``) and what is built once under a file
    lock and only read by samples: the prebuilt Rust dependencies (``rust-deps/``), the Go cache
    template (``go-template/``), javac's class-data archive (``java-cds/``), and for the
    accelerated builds the C++ precompiled header (``cpp-pch/``), the warm javac's classes
    (``java-server/``) and the Go tools' shared inputs (``go-direct/``); plus each Sandbox's
    own caches (``p<pid>-*/``, e.g. the Go build cache).

    ``accelerated=False`` runs today's per-sample build commands (cold javac, no precompiled
    header, ``go test``): the baseline the accelerated builds are measured and checked against.
    Default: ``$TMPDIR/octoray-sandbox-<uid>``.
    """

    def __init__(self, cache_dir: Path | None = None, limits: Limits | None = None,
                 allow_network: bool = False, accelerated: bool = True) -> None:
        self.cache_dir = Path(cache_dir or Path(tempfile.gettempdir())
                              / f"octoray-sandbox-{os.getuid()}").resolve()
        self.limits = limits or Limits()
        self.allow_network = allow_network
        # False: today's per-sample commands, each sample compiled from scratch (the baseline
        # that benchmarks and verdict comparisons run against).
        self.accelerated = accelerated
        self.is_root = os.geteuid() == 0
        # A uid of our own when root: RLIMIT_NPROC then counts only this Sandbox's samples.
        self.uid: int | None = UID_BASE + os.getpid() % UID_SPAN if self.is_root else None
        for sub in ("", "work"):
            (self.cache_dir / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(self.cache_dir / sub, 0o755)
        # This process's writable caches (Go build cache); removed when the Sandbox goes away.
        # One per Sandbox, not per process: two Sandboxes of one process must not remove each
        # other's caches when one of them goes away.
        self.private = Path(tempfile.mkdtemp(prefix=f"p{os.getpid()}-", dir=self.cache_dir))
        os.chmod(self.private, 0o755)
        if self.uid is not None:
            os.chown(self.private, self.uid, self.uid)
        weakref.finalize(self, shutil.rmtree, self.private, True)
        self.isolation = _isolation_mode(self.is_root, self.allow_network)
        self._mount_table = _mount_table(str(self.cache_dir))
        self._toolchain_problems: dict[str, str | None] = {}
        self._toolchain_lock = threading.Lock()
        self._rust_externs: list[str] | None = None
        self._javac_archive: str | None = None  # relative to cache_dir; None: run without
        self._cpp_header: str | None = None  # precompiled CPP_HEADER, relative to cache_dir
        self._java_compiler: java_compiler.JavaCompiler | None = None  # warm javac
        self._go_direct: go_direct.GoDirect | None = None  # Go samples built without go test

    # -- public -------------------------------------------------------------------------------

    def execute(self, language: str, problem: dict, code: str, *,
                test: str | None = None) -> ExecutionResult:
        """Run ``code`` against ``test`` (default ``problem["test"]``); never raises for the
        sample's behaviour -- failures, crashes and hangs come back as a status."""
        start = time.monotonic()
        if language not in LANGUAGES:
            return ExecutionResult("error", f"unknown language {language!r}", 0.0)
        problem_msg = self._toolchain_problem(language)
        if problem_msg:
            return ExecutionResult("error", problem_msg, time.monotonic() - start)
        start = time.monotonic()  # one-time dependency warm-up is not the sample's time
        try:
            program = build_program(language, problem, code, test)
        except (KeyError, ValueError) as exc:  # a malformed problem row is the harness's fault
            return ExecutionResult("error", f"cannot assemble program: {exc!r}",
                                   time.monotonic() - start)
        timeout = TIMEOUTS_S[language] * self.limits.timeout_scale
        status, tail = self._execute_program(language, program.filename, program.source, timeout)
        return ExecutionResult(status, tail, time.monotonic() - start)

    @property
    def _root(self) -> str:
        """The cache dir as samples see it."""
        return SANDBOX_ROOT if self.isolation != "none" else str(self.cache_dir)

    def toolchain_problem(self, language: str) -> str | None:
        """What this sandbox lacks to run ``language`` (one line), or None once its toolchain is
        probed and its dependency caches are warm; the answer is kept for the Sandbox's life."""
        return self._toolchain_problem(language)

    def _execute_program(self, language: str, filename: str, source: str, timeout: float,
                         command: str | None = None) -> tuple[Status, str]:
        """Write ``source`` into a fresh sample directory, run it, delete the directory."""
        workdir = Path(tempfile.mkdtemp(prefix=f"{language}-", dir=self.cache_dir / "work"))
        try:
            # Model output may hold lone surrogates; they must not crash the harness.
            (workdir / filename).write_bytes(source.encode("utf-8", errors="replace"))
            if self.uid is not None:
                os.chown(workdir, self.uid, self.uid)
                os.chown(workdir / filename, self.uid, self.uid)
            if language == "java" and command is None and self._java_compiler is not None:
                return self._run_java(workdir, timeout)
            return self._run(language, workdir, timeout, command)
        except OSError as exc:
            return "error", f"sandbox failure: {exc!r}"
        finally:
            (self.cache_dir / "work" / f"{READY}{workdir.name}").unlink(missing_ok=True)
            shutil.rmtree(workdir, ignore_errors=True)

    # -- per-language commands ----------------------------------------------------------------

    def _command(self, language: str, timeout: float) -> str:
        """Shell command run in the sample's directory (paths as seen inside the sandbox)."""
        root = self._root
        if language == "python":
            return f"{shlex.quote(sys.executable)} -I -B test.py"
        if language == "js":
            return "node test.js"
        if language == "java":
            jvm = _jvm_flags(self.limits.threads)
            javac = " ".join(f"-J{flag}" for flag in jvm.split())
            if self._javac_archive:
                javac += f" -J-XX:SharedArchiveFile={root}/{self._javac_archive}"
            return f"javac {javac} Main.java && java {jvm} -cp . Main"
        if language == "go":
            go_test = f"go test -count=1 -timeout={int(timeout)}s main_test.go"
            return self._go_direct.command(root, timeout, go_test) if self._go_direct else go_test
        if language == "cpp":
            # Flags of the reference (code_eval_octopack): -std=c++11, -lcrypto -lssl (#162).
            # ``-include`` of the precompiled CPP_HEADER, which every program starts with: the
            # compiler state after it equals the state after the program's own first lines,
            # which then re-include nothing (include guards).
            pch = f"-include {shlex.quote(f'{root}/{self._cpp_header}')} " if self._cpp_header else ""
            return f"g++ {CPP_STD} {pch}test.cpp -lcrypto -lssl -o test && ./test"
        if language == "rust":
            deps = f"{root}/rust-deps/target/debug/deps"
            externs = " ".join(f"--extern {e.replace('@ROOT@', root)}"
                               for e in self._rust_externs or [])
            return (f"rustc --edition 2021 --test -A warnings -C debuginfo=0 main.rs -o main "
                    f"-L dependency={deps} {externs} && ./main --test-threads=1 -q")
        raise ValueError(language)

    def _env(self, language: str, workdir_inside: str) -> dict[str, str]:
        """The whole environment of a sample: nothing of ours leaks in."""
        root = self._root
        env = {"PATH": _sample_path(), "HOME": workdir_inside, "TMPDIR": workdir_inside,
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        threads = str(self.limits.threads)
        env.update(OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        if language == "go":
            private = f"{root}/{self.private.name}"
            env.update(GO111MODULE="off", GOPATH=GOPATH, GOCACHE=f"{private}/go-build",
                       GOTMPDIR=workdir_inside, GOFLAGS="", GOENV="off", GOTOOLCHAIN="local",
                       GOMAXPROCS=threads)
        elif language == "js":
            env["NODE_PATH"] = str(NODE_MODULES)
        elif language == "python":
            env.update(PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")
        return env

    def _run_java(self, workdir: Path, timeout: float) -> tuple[Status, str]:
        """``javac Main.java && java … Main`` with the compile done by the warm compiler; the
        program runs as a cold ``java`` in its own sandbox, within what is left of ``timeout``."""
        try:
            self._java_compiler.ensure_running()  # a (re)start is not the sample's time
        except RuntimeError as exc:  # no compiler process starts: back to cold javac for good
            log.warning("sandbox: %s; java samples use javac from now on", exc)
            self._java_compiler = None
            return self._run("java", workdir, timeout)
        started = time.monotonic()
        compiled, messages = self._java_compiler.compile(workdir, timeout)
        (workdir / java_compiler.MESSAGES).unlink(missing_ok=True)  # javac leaves no such file
        if compiled == "crashed":
            # The compiler JVM died (this sample, or the OOM killer, or ...): cold javac gives
            # the reference verdict, within what is left of the budget.
            return self._run("java", workdir, timeout - (time.monotonic() - started))
        if compiled != "ok":
            return ("timeout" if compiled == "timeout" else "fail"), messages[-TAIL_CHARS:]
        left = timeout - (time.monotonic() - started)
        if left <= 0:
            return "timeout", messages[-TAIL_CHARS:]
        status, tail = self._run("java", workdir, left,
                                 f"java {_jvm_flags(self.limits.threads)} -cp . Main")
        return status, (messages + tail)[-TAIL_CHARS:]

    def _start_java_compiler(self, server_classes: str) -> java_compiler.JavaCompiler:
        """A warm javac in its own sandbox (namespaces, uid, rlimits), compiling samples in
        ``work/``; its stderr goes to ``javac-p<pid>-*.log`` in the cache dir, where samples
        cannot write (it is opened by us, and never through a link)."""
        root = self._root
        name = f"javac-{self.private.name}"
        home = self.cache_dir / "work" / name  # the server's own cwd
        log_path = self.cache_dir / f"{name}.log"
        # No attach API: a process of the same uid must not be able to drive the compiler JVM.
        command = (f"exec java {_jvm_flags(self.limits.threads)} -XX:+DisableAttachMechanism "
                   f"-cp {shlex.quote(f'{root}/{server_classes}')} {java_compiler.SERVER_CLASS} "
                   f"{shlex.quote(f'{root}/work')}")

        def start() -> subprocess.Popen:
            home.mkdir(exist_ok=True)
            if self.uid is not None:
                os.chown(home, self.uid, self.uid)
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
            try:
                # CPU backstop for the whole life of the process; each compile has its wall clock.
                return self._popen("java", home, command, cpu_s=3600, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=fd)
            finally:
                os.close(fd)

        def stop(proc: subprocess.Popen) -> None:
            _kill_group(proc)
            for pipe in (proc.stdin, proc.stdout):
                try:
                    pipe.close()
                except OSError:  # a flush into the dead process's pipe
                    pass

        compiler = java_compiler.JavaCompiler(start, stop)
        weakref.finalize(self, compiler.close)
        for leftover in (home, self.cache_dir / "work" / f"{READY}{name}", log_path):
            weakref.finalize(self, _remove, leftover)
        return compiler

    # -- the subprocess -----------------------------------------------------------------------

    def _run(self, language: str, workdir: Path, timeout: float,
             shell_command: str | None = None) -> tuple[Status, str]:
        isolated = self.isolation != "none"
        with tempfile.TemporaryFile(dir=self.cache_dir) as out:
            # Output goes to a file, not a pipe: a sample printing gigabytes cannot fill our
            # memory (RLIMIT_FSIZE caps the file), and we only read its tail.
            proc = self._popen(language, workdir, shell_command or self._command(language, timeout),
                               cpu_s=int(timeout * 2) + 5, stdin=subprocess.DEVNULL, stdout=out)
            timed_out = not _wait_for_exit(proc, timeout)
            _kill_group(proc)
            tail = _tail(out)
        if isolated and not (self.cache_dir / "work" / f"{READY}{workdir.name}").exists():
            return "error", "sandbox setup failed: " + tail
        if timed_out:
            return "timeout", tail
        if proc.returncode != 0:
            return "fail", tail
        if language == "js" and shell_command is None and tail.strip():
            # console.assert only prints; any output at all counts as a failure (reference).
            return "fail", tail
        return "pass", tail

    def _popen(self, language: str, workdir: Path, shell_command: str, *, cpu_s: int,
               stdin, stdout, stderr=subprocess.STDOUT) -> subprocess.Popen:
        """Start ``shell_command`` in ``workdir`` inside the namespaces, as the sandbox uid,
        under the rlimits (``cpu_s``: RLIMIT_CPU, a backstop behind the caller's wall clock)."""
        isolated = self.isolation != "none"
        inside = f"{SANDBOX_ROOT}/work/{workdir.name}" if isolated else str(workdir)
        env = self._env(language, inside)
        command = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), "/bin/sh", "-c", shell_command]
        if isolated:
            argv = [*_unshare_argv(self.is_root, self.allow_network), "/bin/sh", "-c", _SETUP_SH,
                    "octoray-sandbox", self._mount_table, workdir.name,
                    "" if self.uid is None else str(self.uid), *command]
        else:
            argv = command
        limits = self.limits
        rlimits = {  # prlimit option -> value (bytes for as/fsize)
            "as": limits.memory_mb << 20,
            "cpu": cpu_s,
            # Root ignores RLIMIT_NPROC, the sandbox uid does not; a non-root caller's own
            # processes count too, so they are added.
            "nproc": limits.max_processes + (0 if self.is_root else _tasks_of_uid(os.getuid())),
            "fsize": limits.max_file_mb << 20,
            "nofile": limits.max_open_files,
            "core": 0,
        }
        # The namespace script drops privileges itself; without it Popen does (in C, no
        # preexec_fn: that is unsafe in threaded processes such as Ray actors).
        uid = self.uid if not isolated else None
        preexec: Callable[[], None] | None = None
        if shutil.which("prlimit"):
            argv = ["prlimit", *(f"--{k}={v}" for k, v in rlimits.items()), "--", *argv]
        else:
            codes = {"as": resource.RLIMIT_AS, "cpu": resource.RLIMIT_CPU,
                     "nproc": resource.RLIMIT_NPROC, "fsize": resource.RLIMIT_FSIZE,
                     "nofile": resource.RLIMIT_NOFILE, "core": resource.RLIMIT_CORE}

            def set_limits() -> None:  # last resort: runs between fork and exec
                for name, value in rlimits.items():
                    resource.setrlimit(codes[name], (value, value))

            preexec = set_limits
        return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr,
                                cwd=workdir, start_new_session=True, preexec_fn=preexec,
                                user=uid, group=uid, extra_groups=None if uid is None else [],
                                close_fds=True)

    # -- toolchains ---------------------------------------------------------------------------

    def _toolchain_problem(self, language: str) -> str | None:
        """One line saying what is missing for ``language``, or None; checked (and dependency
        caches warmed) once per Sandbox, outside any sample's time budget."""
        with self._toolchain_lock:
            return self._toolchain_problem_locked(language)

    def _toolchain_problem_locked(self, language: str) -> str | None:
        if language not in self._toolchain_problems:
            problem = toolchain_problem(language)
            if problem is None:
                problem = self._probe(language)
            try:
                if problem is None and language == "rust":
                    self._rust_externs = _rust_deps(self.cache_dir)
                if problem is None and language == "go":
                    problem = self._warm_go()
                if problem is None and language == "java":
                    self._javac_archive = _javac_archive(self.cache_dir, self.limits.threads)
                if problem is None and language == "java" and self.accelerated \
                        and self.isolation != "none":  # the compiler needs its own namespaces
                    problem = self._warm_java()
                if problem is None and language == "cpp" and self.accelerated:
                    self._cpp_header = _cpp_precompiled_header(self.cache_dir)
            except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
                problem = f"building {language} dependencies failed: {exc}"
            self._toolchain_problems[language] = problem
        return self._toolchain_problems[language]

    def _probe(self, language: str) -> str | None:
        """Run the toolchain's version command inside the sandbox: catches toolchains the
        sandbox uid cannot reach (e.g. under /root without the namespace bind mounts)."""
        tools = _TOOLS[language] or [shlex.quote(sys.executable)]
        versions = {"go": "go version", "node": "node --version"}
        command = " && ".join(versions.get(t, f"{t} --version") for t in tools)
        status, tail = self._execute_program(language, "probe.txt", "", 60, command)
        if status != "pass":
            return f"{language} toolchain unusable in the sandbox ({status}): {tail.strip()[-300:]}"
        return None

    def _warm_go(self) -> str | None:
        """Give this Sandbox's uid a Go build cache that already holds testify (for samples
        built by go test): a copy of a template built once per cache dir (trusted code, under a
        file lock); samples never write to the shared template. Then one sandboxed trial run:
        through the Go tools directly when accelerated and that works, else through go test."""
        template = _go_template(self.cache_dir)
        gocache = self.private / "go-build"
        if not gocache.exists():
            shutil.copytree(template, gocache, symlinks=True)
            if self.uid is not None:
                for dirpath, _, filenames in os.walk(gocache):
                    os.chown(dirpath, self.uid, self.uid)
                    for name in filenames:
                        os.chown(os.path.join(dirpath, name), self.uid, self.uid)
        if self.accelerated and self._start_go_direct():
            return None
        status, tail = self._execute_program("go", "main_test.go", _GO_WARM, 600)
        return None if status == "pass" else f"go warm-up failed ({status}): {tail[-300:]}"

    def _start_go_direct(self) -> bool:
        """Build Go samples without the go command from now on, once the shared part is built
        and a trusted program passes that way (True); otherwise (logged) samples keep to go test."""
        try:
            relative = go_direct.build(self.cache_dir, _go_env(str(self.cache_dir)))
            self._go_direct = go_direct.GoDirect.load(self.cache_dir, relative)
        except Exception as exc:  # noqa: BLE001 - a speed-up only: any failure leaves go test
            log.warning("sandbox: go samples use go test (%s: %s)", type(exc).__name__, exc)
            return False
        status, tail = self._execute_program("go", "main_test.go", _GO_WARM, 600)
        if status != "pass" or "PASS" not in tail:
            self._go_direct = None
            log.warning("sandbox: go samples use go test: a trusted program failed the direct "
                        "build (%s: %s)", status, tail.strip()[-300:])
            return False
        return True

    def _warm_java(self) -> str | None:
        """Start the warm compiler and check it on a trusted program. A JDK without the
        compiler API (or a server that will not start) leaves samples on cold javac."""
        try:
            server = java_compiler.build_server(self.cache_dir, _java_version(),
                                                _jvm_flags(self.limits.threads))
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("sandbox: no warm java compiler (%s); java samples use javac", exc)
            return None
        self._java_compiler = self._start_java_compiler(server)
        status, tail = self._execute_program("java", "Main.java", _JAVA_WARM, 120)
        if status != "pass":
            self._java_compiler.close()
            self._java_compiler = None
            log.warning("sandbox: the warm java compiler failed a trusted program (%s: %s); "
                        "java samples use javac", status, tail.strip()[-300:])
        return None


_GO_WARM = ('package main\n\nimport (\n    "testing"\n'
            '    "github.com/stretchr/testify/assert"\n)\n\n'
            "func TestWarm(t *testing.T) {\n    assert.Equal(t, 1, 1)\n}\n")


def _go_template(cache_dir: Path) -> Path:
    """A Go build cache with testify compiled, built once per cache dir under a file lock."""
    with build_lock(cache_dir, "go-template") as template:
        if (template / "READY").is_file():
            return template
        for entry in template.iterdir():  # a build killed half-way
            _remove(entry)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            Path(tmp, "main_test.go").write_text(_GO_WARM)
            env = {**_go_env(tmp), "GOCACHE": str(template)}
            res = subprocess.run(["go", "test", "-count=1", "main_test.go"], cwd=tmp, env=env,
                                 capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError((res.stdout + res.stderr).strip()[-300:])
        (template / "READY").write_text("")
        return template


def _remove(path: Path) -> None:
    """Delete a file or a directory tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _go_env(home: str) -> dict[str, str]:
    """The Go environment of trusted builds: GOPATH mode and the samples' PATH (the same go)."""
    return {"PATH": _sample_path(), "HOME": home, "GO111MODULE": "off", "GOPATH": GOPATH,
            "GOENV": "off", "GOTOOLCHAIN": "local"}


def _sample_path() -> str:
    """PATH of every sample, and of the trusted builds whose results samples use."""
    path = ["/usr/local/bin", "/usr/bin", "/bin"]
    sysroot = _rust_sysroot()
    return ":".join([f"{sysroot}/bin", *path] if sysroot else path)


def _jvm_flags(threads: int) -> str:
    """Small heap + C1 only: fits RLIMIT_AS and starts ~2x faster than the default JIT."""
    return (f"-Xmx512m -Xss8m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:-UsePerfData "
            f"-XX:ActiveProcessorCount={threads}")


_JAVA_WARM = ("import java.util.*;\nimport java.lang.*;\nimport java.math.BigInteger;\n"
              "import java.security.*;\nimport java.util.stream.*;\n\n"
              "class Solution {\n    public List<Integer> f(List<Integer> xs) {\n"
              "        return xs.stream().map(x -> x * 2).collect(Collectors.toList());\n    }\n}\n\n"
              "public class Main {\n    public static void main(String[] args) {\n"
              "        Solution s = new Solution();\n"
              "        if (!s.f(Arrays.asList(1, 2)).equals(Arrays.asList(2, 4))) {\n"
              "            throw new AssertionError();\n        }\n    }\n}\n")


@functools.lru_cache(maxsize=1)
def _java_version() -> str:
    """``java -version``'s output, once per process (it keys what is built for one JDK)."""
    return subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=60).stderr


def _javac_archive(cache_dir: Path, threads: int) -> str | None:
    """A class-data-sharing archive of javac's own classes (``-XX:ArchiveClassesAtExit``),
    dumped once per cache dir and JDK under a file lock by compiling a trusted program: javac
    then starts from mapped, pre-parsed classes instead of loading ~3,000 of them, which cuts a
    sample's compile by about a third. Returns the archive's path relative to ``cache_dir``, or
    None (logged) when the JDK cannot dump one -- samples then compile without it, as before."""
    try:
        version = _java_version()
    except (OSError, subprocess.SubprocessError):
        return None
    # The archive is only valid for the JVM that wrote it (and those flags): key it on both.
    relative = f"java-cds/javac-{key_of(version, _jvm_flags(threads))}.jsa"
    archive = cache_dir / relative
    with build_lock(cache_dir, "java-cds"):
        if archive.is_file():
            return relative
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            Path(tmp, "Main.java").write_text(_JAVA_WARM)
            flags = [f"-J{flag}" for flag in _jvm_flags(threads).split()]
            partial = Path(tmp) / "javac.jsa"  # written in full, then renamed into place
            res = subprocess.run(["javac", *flags, f"-J-XX:ArchiveClassesAtExit={partial}",
                                  "Main.java"], cwd=tmp, capture_output=True, text=True,
                                 timeout=300)
            if res.returncode != 0 or not partial.is_file():
                log.warning("sandbox: no javac class-data archive (%s); java samples compile "
                            "without it", (res.stdout + res.stderr).strip()[-200:] or "no file")
                return None
            os.chmod(partial, 0o444)
            os.replace(partial, archive)
        return relative


CPP_STD = "-std=c++11"


def _cpp_precompiled_header(cache_dir: Path) -> str | None:
    """A precompiled header of :data:`CPP_HEADER` (parsing iostream, boost/any & co. is 2/3 of a
    C++ sample's time), built once per cache dir and g++ under a file lock from our own fixed
    text. Returns ``cpp-pch/<key>/header.h`` relative to ``cache_dir`` (g++ finds
    ``header.h.gch`` beside it), or None (logged) when g++ cannot build one -- samples then
    compile without it, as before. A stale or foreign .gch is ignored by g++ itself, which then
    reads ``header.h`` as text: the same program, only slower."""
    try:
        return _build_cpp_precompiled_header(cache_dir)
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        log.warning("sandbox: no C++ precompiled header (%s); cpp samples compile without it", exc)
        return None


def _build_cpp_precompiled_header(cache_dir: Path) -> str:
    # The samples' environment: no CPATH & co. of ours baked into the header.
    env = {"PATH": _sample_path(), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    version = subprocess.run(["g++", "--version"], capture_output=True, text=True, env=env,
                             timeout=60).stdout
    header = "\n".join(CPP_HEADER) + "\n"
    relative = f"cpp-pch/{key_of(version, CPP_STD, header)}/header.h"
    target = cache_dir / relative
    with build_lock(cache_dir, "cpp-pch"):
        if Path(f"{target}.gch").is_file():
            return relative
        target.parent.mkdir(exist_ok=True)
        os.chmod(target.parent, 0o755)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            text, gch = Path(tmp, "header.h"), Path(tmp, "header.h.gch")
            text.write_text(header)
            res = subprocess.run(["g++", CPP_STD, "-x", "c++-header", str(text), "-o", str(gch)],
                                 capture_output=True, text=True, env=env, timeout=300)
            if res.returncode != 0:
                raise RuntimeError((res.stdout + res.stderr).strip()[-200:])
            for path in (text, gch):  # the text first: the .gch's presence says "done"
                os.chmod(path, 0o444)
                os.replace(path, target.parent / path.name)
        return relative


def _wait_for_exit(proc: subprocess.Popen, timeout: float) -> bool:
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


def _kill_group(proc: subprocess.Popen) -> None:
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


def _tail(out) -> str:
    out.flush()
    size = out.seek(0, os.SEEK_END)
    out.seek(max(0, size - 4 * TAIL_CHARS))
    return out.read().decode("utf-8", errors="replace")[-TAIL_CHARS:]


def _unshare_argv(is_root: bool, allow_network: bool) -> list[str]:
    argv = ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--propagation", "private",
            "--mount-proc"]
    if not allow_network:
        argv.append("--net")
    if not is_root:
        argv[1:1] = ["--user", "--map-root-user"]
    return argv


_ISOLATION: dict[tuple[bool, bool], str] = {}


def _isolation_mode(is_root: bool, allow_network: bool) -> str:
    """"namespaces" when unshare works here, else "none" (logged once per process)."""
    key = (is_root, allow_network)
    if key not in _ISOLATION:
        mode, why = "none", "unshare not found"
        if shutil.which("unshare") and (not is_root or shutil.which("setpriv")):
            with tempfile.TemporaryDirectory() as tmp:
                os.chmod(tmp, 0o755)
                (Path(tmp) / "work" / "probe").mkdir(parents=True)
                probe = subprocess.run(
                    [*_unshare_argv(is_root, allow_network), "/bin/sh", "-c", _SETUP_SH,
                     "octoray-sandbox", _mount_table(tmp), "probe", str(UID_BASE) if is_root else "",
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
    """Toolchain directories under hidden home dirs that samples still need (pyenv, rustup,
    a virtualenv or node_modules in a home checkout); worked out once per process."""
    wanted = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent,
              NODE_MODULES}
    sysroot = _rust_sysroot()
    if sysroot:
        wanted.add(Path(sysroot))
    out = set()
    for path in wanted:
        path = path.resolve()
        if path.is_dir() and any(str(path).startswith(h + "/") for h in HIDDEN_DIRS):
            out.add(str(path))
    # A directory inside another kept one comes along with it.
    return tuple(sorted(p for p in out if not any(p.startswith(q + "/") for q in out)))


_SYSROOT: list[str | None] = []


def _rust_sysroot() -> str | None:
    """rustc's toolchain dir (rustup keeps it under the home dir); None without rustc."""
    if not _SYSROOT:
        try:
            res = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True, text=True,
                                 timeout=60)
            _SYSROOT.append(res.stdout.strip() if res.returncode == 0 else None)
        except (OSError, subprocess.SubprocessError):
            _SYSROOT.append(None)
    return _SYSROOT[0]


_TOOLS = {"python": [], "js": ["node"], "java": ["javac", "java"], "go": ["go"],
          "cpp": ["g++"], "rust": ["rustc", "cargo"]}


def _check_toolchain(language: str) -> str | None:
    missing = [tool for tool in _TOOLS[language] if shutil.which(tool) is None]
    if missing:
        return (f"{language} toolchain missing ({', '.join(missing)}): run "
                f"scripts/install_toolchains.sh")
    if language == "js" and not (NODE_MODULES / "js-md5").is_dir():
        return f"js-md5 missing in {NODE_MODULES}: run scripts/install_toolchains.sh"
    if language == "go" and not Path(GOPATH, "src/github.com/stretchr/testify").is_dir():
        return "testify missing: apt-get install golang-github-stretchr-testify-dev"
    if language == "rust" and not DEBIAN_CARGO_REGISTRY.is_dir():
        return f"Debian rust crates missing: apt-get install {RUST_PACKAGES}"
    if language == "cpp" and not Path("/usr/include/boost/any.hpp").is_file():
        return "boost headers missing: apt-get install libboost-dev"
    return None


def toolchain_problem(language: str) -> str | None:
    """One line naming what ``language`` is missing on this machine, or None.

    Cheap (well under a second, nothing compiled), so it can run before any work starts: tools
    on PATH, the library packages, and for Rust that rand/regex/md5 resolve offline from the
    Debian registry -- a crate present without its default-feature packages resolves only there,
    not by looking at directories.
    """
    problem = _check_toolchain(language)
    if problem is None and language == "rust":
        with tempfile.TemporaryDirectory(prefix="octoray-rust-check-") as tmp:
            env = _write_rust_project(Path(tmp))
            try:
                res = subprocess.run(["cargo", "generate-lockfile", "--offline"], cwd=tmp, env=env,
                                     capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as exc:
                return f"rust: cargo failed to run ({exc})"
            if res.returncode != 0:
                lines = [line for line in res.stderr.splitlines() if line.startswith("error")]
                why = lines[0].removeprefix("error: ") if lines else "cargo could not resolve them"
                return (f"rust crates rand/regex/md5 do not resolve offline ({why}): apt-get install "
                        f"{RUST_PACKAGES}")
    return problem


def _write_rust_project(project: Path) -> dict[str, str]:
    """A cargo project depending on :data:`RUST_DEPS` from the Debian directory source, in
    ``project``; returns the environment cargo needs to use it offline."""
    (project / "src").mkdir(parents=True, exist_ok=True)
    (project / "src" / "lib.rs").write_text("")
    (project / "Cargo.toml").write_text(
        '[package]\nname = "octoray-rust-deps"\nversion = "0.1.0"\nedition = "2021"\n\n'
        "[dependencies]\n" + "".join(f'{k} = "{v}"\n' for k, v in RUST_DEPS.items()))
    home = project / "cargo-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        '[source.crates-io]\nreplace-with = "debian"\n\n'
        f'[source.debian]\ndirectory = "{DEBIAN_CARGO_REGISTRY}"\n')
    return {**os.environ, "CARGO_HOME": str(home)}


def _rust_deps(cache_dir: Path) -> list[str]:
    """Build rand/regex/md5 once per cache dir (trusted Debian sources, under a file lock) and
    return ``--extern name=@ROOT@/...rlib`` specs; samples then compile with plain rustc
    against these read-only rlibs -- no cargo, no per-sample dependency rebuild."""
    with build_lock(cache_dir, "rust-deps") as deps:
        ready = deps / "externs.json"
        if ready.is_file():
            return json.loads(ready.read_text())
        env = _write_rust_project(deps)
        res = subprocess.run(["cargo", "build", "--offline", "--message-format=json"], cwd=deps,
                             env=env, capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            raise RuntimeError(res.stderr.strip()[-300:] or "cargo failed")
        externs = []
        for line in res.stdout.splitlines():
            msg = json.loads(line) if line.startswith("{") else {}
            name = msg.get("target", {}).get("name")
            if msg.get("reason") == "compiler-artifact" and name in RUST_DEPS:
                rlib = next(f for f in msg["filenames"] if f.endswith(".rlib"))
                externs.append(f"{name}=@ROOT@/" + str(Path(rlib).relative_to(cache_dir)))
        if sorted(e.split("=")[0] for e in externs) != sorted(RUST_DEPS):
            raise RuntimeError(f"cargo built {externs}, expected {sorted(RUST_DEPS)}")
        for dirpath, dirnames, filenames in os.walk(deps):  # readable, not writable, by samples
            for name in dirnames:
                os.chmod(os.path.join(dirpath, name), 0o755)
        ready.write_text(json.dumps(externs))
        return externs


def _tasks_of_uid(uid: int) -> int:
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
