"""The sandbox's toolchains: where each language's tools and libraries are, the builds shared by
every sample (Rust's dependencies, Go's testify cache, javac's class-data archive, C++'s
precompiled header; each built once per cache dir from trusted text, under a file lock), and the
check that a language can run at all (:func:`toolchain_problem`).

Nothing here runs a sample: :mod:`octoray.evaluation.sandbox.execution` does, with these.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from octoray.evaluation.sandbox.programs import CPP_HEADER
from octoray.evaluation.sandbox.shared_builds import build_lock, key_of

log = logging.getLogger(__name__)


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


GO_WARM = ('package main\n\nimport (\n    "testing"\n'
            '    "github.com/stretchr/testify/assert"\n)\n\n'
            "func TestWarm(t *testing.T) {\n    assert.Equal(t, 1, 1)\n}\n")


def go_template(cache_dir: Path) -> Path:
    """A Go build cache with testify compiled, built once per cache dir under a file lock."""
    with build_lock(cache_dir, "go-template") as template:
        if (template / "READY").is_file():
            return template
        for entry in template.iterdir():  # a build killed half-way
            remove_path(entry)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            Path(tmp, "main_test.go").write_text(GO_WARM)
            env = {**go_env(tmp), "GOCACHE": str(template)}
            res = subprocess.run(["go", "test", "-count=1", "main_test.go"], cwd=tmp, env=env,
                                 capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError((res.stdout + res.stderr).strip()[-300:])
        (template / "READY").write_text("")
        return template


def remove_path(path: Path) -> None:
    """Delete a file or a directory tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def go_env(home: str) -> dict[str, str]:
    """The Go environment of trusted builds: GOPATH mode and the samples' PATH (the same go)."""
    return {"PATH": sample_path(), "HOME": home, "GO111MODULE": "off", "GOPATH": GOPATH,
            "GOENV": "off", "GOTOOLCHAIN": "local"}


def sample_path() -> str:
    """PATH of every sample, and of the trusted builds whose results samples use."""
    path = ["/usr/local/bin", "/usr/bin", "/bin"]
    sysroot = rust_sysroot()
    return ":".join([f"{sysroot}/bin", *path] if sysroot else path)


def jvm_flags(threads: int) -> str:
    """Small heap + C1 only: fits RLIMIT_AS and starts ~2x faster than the default JIT."""
    return (f"-Xmx512m -Xss8m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:-UsePerfData "
            f"-XX:ActiveProcessorCount={threads}")


JAVA_WARM = ("import java.util.*;\nimport java.lang.*;\nimport java.math.BigInteger;\n"
              "import java.security.*;\nimport java.util.stream.*;\n\n"
              "class Solution {\n    public List<Integer> f(List<Integer> xs) {\n"
              "        return xs.stream().map(x -> x * 2).collect(Collectors.toList());\n    }\n}\n\n"
              "public class Main {\n    public static void main(String[] args) {\n"
              "        Solution s = new Solution();\n"
              "        if (!s.f(Arrays.asList(1, 2)).equals(Arrays.asList(2, 4))) {\n"
              "            throw new AssertionError();\n        }\n    }\n}\n")


@functools.lru_cache(maxsize=1)
def java_version() -> str:
    """``java -version``'s output, once per process (it keys what is built for one JDK)."""
    return subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=60).stderr


def javac_archive(cache_dir: Path, threads: int) -> str | None:
    """A class-data-sharing archive of javac's own classes (``-XX:ArchiveClassesAtExit``),
    dumped once per cache dir and JDK under a file lock by compiling a trusted program: javac
    then starts from mapped, pre-parsed classes instead of loading ~3,000 of them, which cuts a
    sample's compile by about a third. Returns the archive's path relative to ``cache_dir``, or
    None (logged) when the JDK cannot dump one -- samples then compile without it, as before."""
    try:
        version = java_version()
    except (OSError, subprocess.SubprocessError):
        return None
    # The archive is only valid for the JVM that wrote it (and those flags): key it on both.
    relative = f"java-cds/javac-{key_of(version, jvm_flags(threads))}.jsa"
    archive = cache_dir / relative
    with build_lock(cache_dir, "java-cds"):
        if archive.is_file():
            return relative
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            Path(tmp, "Main.java").write_text(JAVA_WARM)
            flags = [f"-J{flag}" for flag in jvm_flags(threads).split()]
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


def cpp_precompiled_header(cache_dir: Path) -> str | None:
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
    env = {"PATH": sample_path(), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
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


_SYSROOT: list[str | None] = []


def rust_sysroot() -> str | None:
    """rustc's toolchain dir (rustup keeps it under the home dir); None without rustc."""
    if not _SYSROOT:
        try:
            res = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True, text=True,
                                 timeout=60)
            _SYSROOT.append(res.stdout.strip() if res.returncode == 0 else None)
        except (OSError, subprocess.SubprocessError):
            _SYSROOT.append(None)
    return _SYSROOT[0]


TOOLS = {"python": [], "js": ["node"], "java": ["javac", "java"], "go": ["go"],
          "cpp": ["g++"], "rust": ["rustc", "cargo"]}


def _check_toolchain(language: str) -> str | None:
    missing = [tool for tool in TOOLS[language] if shutil.which(tool) is None]
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


def rust_deps(cache_dir: Path) -> list[str]:
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
