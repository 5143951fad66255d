"""Adversarial samples against the execution sandbox: each must end as fail/timeout, nothing may
escape (canaries intact, no connection to a local listener, no leftover processes) and the
sandbox must still pass a normal sample afterwards."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from octoray.evaluation.sandbox.execution import Limits, Sandbox
from octoray.evaluation.sandbox.java_compiler import SERVER_CLASS

pytestmark = pytest.mark.toolchain

# A trivial HumanEvalPack-like Python problem: the sample defines f, the test checks it.
PROBLEM = {"task_id": "Python/adversarial", "declaration": "def f():\n",
           "test": "\ndef check(f):\n    assert f() == 1\n\ncheck(f)\n"}
GOOD = "def f():\n    return 1\n"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Sandbox:
    # Short timeouts keep the suite quick: python 10 s -> 5 s.
    sb = Sandbox(cache_dir=tmp_path_factory.mktemp("sandbox-cache"),
                 limits=Limits(memory_mb=1024, timeout_scale=0.5))
    if sb.isolation == "none":
        pytest.skip("no namespace isolation on this machine (unshare unavailable)")
    return sb


def _leftovers(sb: Sandbox) -> list[int]:
    """Processes still running under the sandbox's uid (root mode: one uid per Sandbox), but for
    the Sandbox's own warm java compiler, which lives as long as the Sandbox."""
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if (os.stat(f"/proc/{pid}").st_uid == sb.uid
                        and SERVER_CLASS.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()):
                    pids.append(int(pid))
            except OSError:
                pass
    return pids


def _run(sb: Sandbox, body: str, language: str = "python", problem: dict = PROBLEM):
    res = sb.execute(language, problem, body)
    assert res.status in ("fail", "timeout"), res
    if sb.uid is not None:
        assert _leftovers(sb) == [], "sandbox processes survived the sample"
    healthy = sb.execute("python", PROBLEM, GOOD)
    assert healthy.status == "pass", healthy
    return res


def test_normal_sample_passes_and_wrong_one_fails(sandbox: Sandbox) -> None:
    assert sandbox.execute("python", PROBLEM, GOOD).status == "pass"
    res = sandbox.execute("python", PROBLEM, "def f():\n    return 2\n")
    assert res.status == "fail" and "AssertionError" in res.stderr_tail


def test_infinite_loop_times_out(sandbox: Sandbox) -> None:
    res = _run(sandbox, "def f():\n    while True:\n        pass\n")
    assert res.status == "timeout"
    assert res.duration_s < 10


def test_fork_bomb_and_setsid_daemon_are_killed(sandbox: Sandbox) -> None:
    # A daemon that escapes the process group (setsid) must die with the sample too.
    body = ("import os\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            "        import time; time.sleep(300)\n"
            "    os._exit(0)\n"
            "def f():\n"
            "    while True:\n"
            "        try:\n"
            "            os.fork()\n"
            "        except OSError:\n"
            "            pass\n")
    res = _run(sandbox, body)
    assert res.duration_s < 15


def test_memory_hog_fails(sandbox: Sandbox) -> None:
    # 512 MiB chunks: the second one crosses the 1 GiB address-space limit.
    body = ("def f():\n    chunks = []\n    while True:\n"
            "        chunks.append(bytearray(512 << 20))\n")
    res = _run(sandbox, body)
    assert res.status == "fail" and "MemoryError" in res.stderr_tail


def test_files_outside_the_sample_dir_are_untouchable(sandbox: Sandbox, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(outside, 0o777)  # even a world-writable directory of ours stays out of reach
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    # A canary the sample can see (the cache dir is visible inside the sandbox at /mnt/sbx).
    visible = sandbox.cache_dir / "canary.txt"
    visible.write_text("alive")
    stray = Path("/tmp") / f"octoray-stray-{os.getpid()}"
    body = ("import os, shutil\n"
            "errors = []\n"
            f"for action in (lambda: open({str(outside / 'x')!r}, 'w').write('x'),\n"
            f"               lambda: os.remove({str(canary)!r}),\n"
            f"               lambda: os.remove('/mnt/sbx/canary.txt'),\n"
            f"               lambda: open('/mnt/sbx/canary.txt', 'w').write('pwned'),\n"
            f"               lambda: open({str(stray)!r}, 'w').write('x'),\n"
            "               lambda: open('/root/.octoray-stray', 'w').write('x'),\n"
            "               lambda: shutil.rmtree('/mnt/sbx/work')):\n"
            "    try:\n"
            "        action()\n"
            "    except OSError as exc:\n"
            "        errors.append(exc)\n"
            "print(len(errors), 'blocked')\n"
            "def f():\n    return 0\n")
    _run(sandbox, body)
    assert canary.read_text() == "alive"
    assert visible.read_text() == "alive"
    assert list(outside.iterdir()) == []
    assert not stray.exists()
    assert not Path("/root/.octoray-stray").exists()


def test_network_is_cut(sandbox: Sandbox) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    connections: list = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connections.append(server.accept())
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        body = ("import socket\n"
                f"socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')\n"
                "def f():\n    return 1\n")
        res = _run(sandbox, body)
        assert "unreachable" in res.stderr_tail or "refused" in res.stderr_tail
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
        server.close()
    assert connections == []


def test_killing_the_parent_does_not_escape(sandbox: Sandbox) -> None:
    body = ("import os, signal\n"
            "for target in (lambda: os.kill(os.getppid(), 9), lambda: os.killpg(0, 9),\n"
            "               lambda: os.kill(1, 9), lambda: os.kill(-1, 9)):\n"
            "    try:\n"
            "        target()\n"
            "    except OSError:\n"
            "        pass\n"
            "def f():\n    return 1\n")
    _run(sandbox, body)  # kill(-1) takes the sample down with it: fail, and we are still here


def test_cpp_infinite_loop_times_out(sandbox: Sandbox) -> None:
    problem = {"task_id": "CPP/adversarial", "declaration": "int f(){\n",
               "test": "#include<assert.h>\nint main(){\n    assert(f() == 1);\n}\n"}
    quick = Sandbox(cache_dir=sandbox.cache_dir, limits=Limits(memory_mb=1024, timeout_scale=0.2))
    res = _run(quick, "int f(){\n    while (true) {}\n    return 1;\n}\n", "cpp", problem)
    assert res.status == "timeout"


# -- hostile programs aimed at the compile step ----------------------------------------------------

CPP_PROBLEM = {"task_id": "CPP/adversarial", "declaration": "int f(){\n",
               "test": "#include<assert.h>\nint main(){\n    assert(f() == 1);\n}\n"}
CPP_GOOD = "int f(){\n    return 1;\n}\n"
JAVA_PROBLEM = {"task_id": "Java/adversarial", "declaration": "class Solution {\n",
                "test": "public class Main {\n    public static void main(String[] args) {\n"
                        "        if (new Solution().f() != 1) throw new AssertionError();\n    }\n}\n"}
JAVA_GOOD = "class Solution {\n    int f() { return 1; }\n}\n"


def test_cpp_compile_time_explosion_ends_and_the_compiler_still_works(sandbox: Sandbox) -> None:
    # Each macro doubles the one before: 2^40 tokens for the compiler to expand.
    bomb = "".join(f"#define E{i} E{i - 1} E{i - 1}\n" for i in range(1, 41))
    body = "#define E0 1+\nint f(){\n    return E40 1;\n}\n"
    quick = Sandbox(cache_dir=sandbox.cache_dir, limits=Limits(memory_mb=1024, timeout_scale=0.2))
    _run(quick, "#define E0 1+\n" + bomb + body, "cpp", CPP_PROBLEM)
    assert quick.execute("cpp", CPP_PROBLEM, CPP_GOOD).status == "pass"


def test_java_source_that_overflows_the_compiler_fails_and_the_warm_compiler_goes_on(
        sandbox: Sandbox) -> None:
    # Nesting deep enough to overflow javac's stack: javac reports it and exits non-zero, cold or
    # warm; the warm compiler goes on (or, had its JVM died, would start afresh).
    depth = 200_000
    body = ("class Solution {\n    int f() { return " + "(" * depth + "1" + ")" * depth + "; }\n}\n")
    limits = Limits(timeout_scale=0.5)  # the JVMs need more than the fixture's 1 GiB of address space
    warm, cold = (Sandbox(cache_dir=sandbox.cache_dir, limits=limits, accelerated=fast) for fast in (True, False))
    for sb in (warm, cold):
        _run(sb, body, "java", JAVA_PROBLEM)
        assert sb.execute("java", JAVA_PROBLEM, JAVA_GOOD).status == "pass"
    assert warm._java_compiler is not None


def test_an_interpreter_under_tmp_stays_visible_inside(sandbox: Sandbox, tmp_path: Path) -> None:
    """A checkout under /tmp (CI runners' usual place) keeps its virtualenv inside the sandbox,
    although the sandbox mounts a fresh /tmp: the sample runs, and sees nothing else of /tmp."""
    import subprocess
    import sys
    import sysconfig

    if not str(tmp_path).startswith("/tmp/"):
        pytest.skip(f"pytest's tmp_path is not under /tmp here ({tmp_path})")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # This environment's packages (numpy: the harness imports it) through a .pth file, as in a
    # virtualenv of its own; octoray itself through PYTHONPATH, for the driver below.
    purelib = sysconfig.get_paths()["purelib"]
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "outer.pth").write_text(purelib + "\n")
    canary = tmp_path / "canary.txt"
    canary.write_text("outside")
    blind = f"import os\ndef f():\n    return int(not os.path.exists({str(canary)!r}))\n"
    code = (
        "from octoray.evaluation.sandbox.execution import Limits, Sandbox\n"
        f"sb = Sandbox(cache_dir={str(tmp_path / 'cache')!r}, limits=Limits(timeout_scale=0.5))\n"
        f"print(sb.execute('python', {PROBLEM!r}, {GOOD!r}).status)\n"
        f"print(sb.execute('python', {PROBLEM!r}, {blind!r}).status)\n")
    # The venv's interpreter with this environment's packages: its sys.prefix is under /tmp.
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.stdout.split() == ["pass", "pass"], out.stdout + out.stderr[-2000:]
