"""A warm ``javac`` for the sandbox: one long-lived compiler JVM per Sandbox, inside its namespaces.

A cold ``javac`` spends ~0.3 s of a Java sample starting a JVM and loading, verifying and
JIT-compiling the compiler's own classes before it reads the sample. This module keeps one
compiler JVM running (started by the Sandbox with the same namespaces, uid and rlimits as a
sample) and hands it one sample directory at a time over a pipe; it answers with javac's exit
code and leaves javac's messages in the sample directory. The sample's program itself still runs
as its own cold ``java`` process, exactly as before.

Why this is safe to share between samples: compiling runs no code of the sample (annotation
processing is off, ``-proc:none``; the class path is the sample's own directory, which holds
only its source), so one sample cannot change how the next one compiles. What a hostile source
can do to the compiler -- take too long, exhaust its memory, crash it -- is bounded by the
sample's wall-clock budget: the compiler is killed with its namespace and started afresh for the
next sample, and the sample gets the verdict a cold ``javac`` would have given (timeout, or a
failed compile).

Same verdicts as ``javac Main.java`` run in the sample's directory: same compiler, same JVM
flags (heap, stack), class path and output directory = the sample's directory, messages to the
same output (only their file names are absolute).
"""

from __future__ import annotations

import os
import select
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Literal

from octoray.evaluation.sandbox.shared_builds import build_lock, key_of

CompileStatus = Literal["ok", "fail", "timeout", "crashed"]

SERVER_CLASS = "OctorayJavacServer"
MESSAGES = ".javac-messages"  # javac's output, written by the server into the sample directory
# A fresh JVM now and then bounds what one compiler process accumulates (heap, CPU time under
# its RLIMIT_CPU); restarting costs one cold compile.
COMPILES_PER_SERVER = 400

# The compiler process's source (trusted, ours), beside this module.
_SERVER_SOURCE = Path(__file__).with_name(f"{SERVER_CLASS}.java")


def build_server(cache_dir: Path, java_version: str, jvm_flags: str) -> str:
    """Compile the server once per cache dir and JDK (``java -version``'s output; under a file
    lock); returns its class directory relative to ``cache_dir``. Raises
    CalledProcessError/OSError when javac fails."""
    relative = f"java-server/{key_of(java_version, jvm_flags, _SERVER_SOURCE.read_text())}"
    target = cache_dir / relative
    with build_lock(cache_dir, "java-server"):
        if (target / f"{SERVER_CLASS}.class").is_file():
            return relative
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            subprocess.run(["javac", "-d", tmp, str(_SERVER_SOURCE)], cwd=tmp, check=True,
                           capture_output=True, timeout=300)
            for path in (Path(tmp), *Path(tmp).iterdir()):
                os.chmod(path, 0o755 if path.is_dir() else 0o444)
            os.replace(tmp, target)
        return relative


class JavaCompiler:
    """One warm compiler process, restarted whenever it is killed, crashes or has compiled
    :data:`COMPILES_PER_SERVER` samples. ``start()`` launches it inside the sandbox."""

    def __init__(self, start: Callable[[], subprocess.Popen], stop: Callable[[subprocess.Popen], None],
                 startup_timeout: float = 120.0) -> None:
        self._start = start
        self._stop = stop
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen | None = None
        self._compiles = 0
        self._lock = threading.Lock()  # one request on the pipe at a time

    def ensure_running(self) -> None:
        """Start the compiler process if none is running. Raises RuntimeError when it will not."""
        with self._lock:
            self._running()

    def compile(self, sample_dir: Path, timeout: float) -> tuple[CompileStatus, str]:
        """Compile ``sample_dir/Main.java`` within ``timeout`` seconds; returns the status
        ("crashed": the compiler process died, the verdict is not known) and javac's messages.
        Raises RuntimeError when no compiler process can be started."""
        with self._lock:
            return self._compile(sample_dir, timeout)

    def _compile(self, sample_dir: Path, timeout: float) -> tuple[CompileStatus, str]:
        proc = self._running()
        deadline = time.monotonic() + timeout
        try:
            proc.stdin.write(f"{sample_dir.name}\n".encode())
            proc.stdin.flush()
            answer = _read_line(proc, deadline)
        except OSError:
            answer = None
        messages = _read_text(sample_dir / MESSAGES)
        if answer is None or not answer.strip().lstrip("-").isdigit():
            self.close()
            if time.monotonic() >= deadline:
                return "timeout", messages
            return "crashed", messages + f"\njava compiler stopped: {(answer or 'no answer').strip()}"
        self._compiles += 1
        if self._compiles >= COMPILES_PER_SERVER:
            self.close()
        return ("ok" if int(answer) == 0 else "fail"), messages

    def close(self) -> None:
        """Stop the compiler process (the next compile starts a new one)."""
        if self._proc is not None:
            self._stop(self._proc)
            self._proc = None
        self._compiles = 0

    def _running(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self.close()
            proc = self._start()
            if _read_line(proc, time.monotonic() + self._startup_timeout) != "ready\n":
                self._stop(proc)
                raise RuntimeError("the java compiler process did not start")
            self._proc = proc
        return self._proc


def _read_line(proc: subprocess.Popen, deadline: float) -> str | None:
    """One line from ``proc``'s stdout, or None at EOF or when ``deadline`` passes."""
    fd = proc.stdout.fileno()
    poller = select.poll()  # not select.select: a long-lived worker's fds may pass 1024
    poller.register(fd, select.POLLIN)
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            return None
        chunk = os.read(fd, 1)  # byte by byte: never read past the answer
        if not chunk:
            return None
        line += chunk
    return line.decode("utf-8", errors="replace")


def _read_text(path: Path) -> str:
    """The end of a file the compiler (the sample's uid) wrote: never through a link, never a
    FIFO or device that would block or leak another file into the results."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return ""
        file.seek(max(0, info.st_size - 4000))
        return file.read(4000).decode("utf-8", errors="replace")
