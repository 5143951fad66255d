"""The execution sandbox: the only place in octoray that runs untrusted (model-generated) code.

This module, with its two helpers for the accelerated builds -- ``java_compiler`` (the warm
javac it starts inside the sandbox) and ``go_direct`` (the Go build steps it runs inside the
sandbox) -- is all of it; nothing else in octoray starts a sample's code or its compiler. Its
neighbours in :mod:`octoray.evaluation.sandbox` run none: ``isolation`` holds the namespace set-up
and the process-tree kill it uses, ``toolchains`` the tools and the trusted shared builds
(built from octoray's own text, never a sample's), ``programs`` assembles a sample's program.

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

import logging
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from octoray.evaluation.humanevalpack import LANGUAGES
from octoray.evaluation.sandbox import go_direct, java_compiler
from octoray.evaluation.sandbox.isolation import (READY, SANDBOX_ROOT, SETUP_SH, UID_BASE, UID_SPAN, isolation_mode,
                                                  kill_group, mount_table, tasks_of_uid, unshare_argv, wait_for_exit)
from octoray.evaluation.sandbox.programs import build_program
from octoray.evaluation.sandbox.toolchains import (CPP_STD, GO_WARM, GOPATH, JAVA_WARM, NODE_MODULES, TOOLS,
                                                   cpp_precompiled_header, go_env, go_template, java_version,
                                                   javac_archive, jvm_flags, remove_path, rust_deps, sample_path,
                                                   toolchain_problem)

log = logging.getLogger(__name__)

Status = Literal["pass", "fail", "timeout", "error"]

# Wall-clock seconds per sample, compile + run. Source: bigcode-evaluation-harness
# tasks/humanevalpack.py LANGUAGE_TO_TIMEOUT (rust's 300 s covers cargo's first compile of the
# dependencies there; here the dependencies are prebuilt once, outside the per-sample budget).
TIMEOUTS_S: dict[str, float] = {"python": 10, "js": 10, "java": 10, "go": 20, "cpp": 60,
                                "rust": 300}

TAIL_CHARS = 2000


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
        self.isolation = isolation_mode(self.is_root, self.allow_network)
        self._mount_table = mount_table(str(self.cache_dir))
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
            jvm = jvm_flags(self.limits.threads)
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
        env = {"PATH": sample_path(), "HOME": workdir_inside, "TMPDIR": workdir_inside,
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
                                 f"java {jvm_flags(self.limits.threads)} -cp . Main")
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
        command = (f"exec java {jvm_flags(self.limits.threads)} -XX:+DisableAttachMechanism "
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
            kill_group(proc)
            for pipe in (proc.stdin, proc.stdout):
                try:
                    pipe.close()
                except OSError:  # a flush into the dead process's pipe
                    pass

        compiler = java_compiler.JavaCompiler(start, stop)
        weakref.finalize(self, compiler.close)
        for leftover in (home, self.cache_dir / "work" / f"{READY}{name}", log_path):
            weakref.finalize(self, remove_path, leftover)
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
            timed_out = not wait_for_exit(proc, timeout)
            kill_group(proc)
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
            argv = [*unshare_argv(self.is_root, self.allow_network), "/bin/sh", "-c", SETUP_SH,
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
            "nproc": limits.max_processes + (0 if self.is_root else tasks_of_uid(os.getuid())),
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
                    self._rust_externs = rust_deps(self.cache_dir)
                if problem is None and language == "go":
                    problem = self._warm_go()
                if problem is None and language == "java":
                    self._javac_archive = javac_archive(self.cache_dir, self.limits.threads)
                if problem is None and language == "java" and self.accelerated \
                        and self.isolation != "none":  # the compiler needs its own namespaces
                    problem = self._warm_java()
                if problem is None and language == "cpp" and self.accelerated:
                    self._cpp_header = cpp_precompiled_header(self.cache_dir)
            except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
                problem = f"building {language} dependencies failed: {exc}"
            self._toolchain_problems[language] = problem
        return self._toolchain_problems[language]

    def _probe(self, language: str) -> str | None:
        """Run the toolchain's version command inside the sandbox: catches toolchains the
        sandbox uid cannot reach (e.g. under /root without the namespace bind mounts)."""
        tools = TOOLS[language] or [shlex.quote(sys.executable)]
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
        template = go_template(self.cache_dir)
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
        status, tail = self._execute_program("go", "main_test.go", GO_WARM, 600)
        return None if status == "pass" else f"go warm-up failed ({status}): {tail[-300:]}"

    def _start_go_direct(self) -> bool:
        """Build Go samples without the go command from now on, once the shared part is built
        and a trusted program passes that way (True); otherwise (logged) samples keep to go test."""
        try:
            relative = go_direct.build(self.cache_dir, go_env(str(self.cache_dir)))
            self._go_direct = go_direct.GoDirect.load(self.cache_dir, relative)
        except Exception as exc:  # noqa: BLE001 - a speed-up only: any failure leaves go test
            log.warning("sandbox: go samples use go test (%s: %s)", type(exc).__name__, exc)
            return False
        status, tail = self._execute_program("go", "main_test.go", GO_WARM, 600)
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
            server = java_compiler.build_server(self.cache_dir, java_version(),
                                                jvm_flags(self.limits.threads))
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("sandbox: no warm java compiler (%s); java samples use javac", exc)
            return None
        self._java_compiler = self._start_java_compiler(server)
        status, tail = self._execute_program("java", "Main.java", JAVA_WARM, 120)
        if status != "pass":
            self._java_compiler.close()
            self._java_compiler = None
            log.warning("sandbox: the warm java compiler failed a trusted program (%s: %s); "
                        "java samples use javac", status, tail.strip()[-300:])
        return None


def _tail(out) -> str:
    out.flush()
    size = out.seek(0, os.SEEK_END)
    out.seek(max(0, size - 4 * TAIL_CHARS))
    return out.read().decode("utf-8", errors="replace")[-TAIL_CHARS:]


