"""Go samples built by the Go tools directly, not through ``go test``: 0.3 s less per sample.

``go test main_test.go`` spends most of a HumanEvalPack sample on work that is the same for
every sample: loading and hashing the ~150 packages testify pulls in (net/http, yaml, ...) to
decide that nothing needs rebuilding, before it compiles the sample's package, vets it, writes
and compiles a ``_testmain.go``, links and runs the test binary. This module does the shared part
once per cache dir and Go installation: it builds a template test that imports every importable
package (the standard library and the GOPATH packages) with ``go test -x -work``, and keeps what
that run produced and printed -- the export data and vet facts of every package, the link's
import config -- plus a small generator of ours (``gotest_generator.go``, built here).

Per sample, inside the sandbox, the generator reads the sample's test file and writes what
``go test`` would derive from it (import configs, ``vet.cfg``, ``_testmain.go``, following
cmd/go's load/test.go for go1.19); then the very commands ``go test -x`` shows run: compile,
vet with go test's analyzers, compile the test main, link, run with the same ``-test.*`` flags.
Whatever the generator does not handle exactly as cmd/go does -- a parse error, cgo, an import it
does not know, benchmarks or fuzz targets, a test function with a wrong signature -- makes it exit
3, and the sample goes through ``go test`` itself: same verdicts either way.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from octoray.evaluation.sandbox.shared_builds import build_lock, key_of

# cmd/go's defaultVetFlags (go1.19 cmd/go/internal/test/test.go): the analyzers go test runs.
VET_FLAGS = "-atomic -bool -buildtags -errorsas -ifaceassert -nilfunc -printf -stringintconv"
BUILD_DIR = "go-build-octoray"  # in the sample's directory, as go test's own $GOTMPDIR/go-build*
CONFIG = "direct.json"
GENERATOR = "octoray-gotest"

# Our generator (Go), built once per cache dir with the rest of the shared part.
GENERATOR_SOURCE = Path(__file__).with_name("gotest_generator.go")


def build(cache_dir: Path, env: dict[str, str]) -> str:
    """Build the shared part once per cache dir and Go installation (under a file lock; ``env``
    is the Go environment of the samples, GOPATH mode). Returns its directory relative to
    ``cache_dir``. Raises RuntimeError (or OSError/SubprocessError) when any step fails."""
    version = _go(["go", "version"], env, cache_dir).strip()
    tooldir = _go(["go", "env", "GOTOOLDIR"], env, cache_dir).strip()
    relative = f"go-direct/{key_of(version, tooldir, _tree_state(env['GOPATH']), GENERATOR_SOURCE.read_text())}"
    target = cache_dir / relative
    with build_lock(cache_dir, "go-direct"):
        if (target / CONFIG).is_file():
            return relative
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            staging = Path(tmp) / "out"
            staging.mkdir()
            build_env = {**env, "GOCACHE": str(Path(tmp) / "gocache"), "GOTMPDIR": tmp}
            config = _template_build(Path(tmp), build_env, staging, cache_dir / relative)
            config["tooldir"] = tooldir
            config["goversion"] = version.split()[2]
            (staging / CONFIG).write_text(json.dumps(config, indent=1))
            _go(["go", "build", "-o", str(staging / GENERATOR), str(GENERATOR_SOURCE)], build_env, Path(tmp))
            for dirpath, _, filenames in os.walk(staging):  # readable, not writable, by samples
                os.chmod(dirpath, 0o755)
                for name in filenames:
                    os.chmod(os.path.join(dirpath, name), 0o755 if name == GENERATOR else 0o444)
            os.replace(staging, target)
        return relative


@dataclass(frozen=True)
class GoDirect:
    """The shared part, as a Sandbox uses it."""

    relative: str   # its directory, relative to the cache dir
    tooldir: str    # go env GOTOOLDIR
    goversion: str  # e.g. go1.19.8

    @classmethod
    def load(cls, cache_dir: Path, relative: str) -> "GoDirect":
        config = json.loads((cache_dir / relative / CONFIG).read_text())
        return cls(relative, config["tooldir"], config["goversion"])

    def steps(self, root: str, timeout: float) -> list[tuple[str, str]]:
        """(phase, shell command) for one sample in its directory (``root``: the cache dir as
        the sample sees it): generate, then the commands ``go test -x`` shows."""
        tools, version, b = shlex.quote(self.tooldir), self.goversion, BUILD_DIR
        generator, config = (shlex.quote(f"{root}/{self.relative}/{name}") for name in (GENERATOR, CONFIG))
        return [
            ("generate", f"{generator} {config} {shlex.quote(root)} \"$PWD/main_test.go\" \"$PWD/{b}\""),
            ("compile", f"{tools}/compile -o {b}/_pkg_.a -p command-line-arguments -complete -dwarf=false "
                        f"-goversion {version} -D \"_$PWD\" -importcfg {b}/importcfg -pack ./main_test.go"),
            ("vet", f"TERM=dumb {tools}/vet {VET_FLAGS} {b}/vet.cfg"),
            ("compile test main", f"{tools}/compile -o {b}/_testmain.a -p main -complete -dwarf=false "
                                  f"-goversion {version} -nolocalimports -importcfg {b}/importcfg.testmain "
                                  f"-pack {b}/_testmain.go"),
            ("link", f"{tools}/link -o {b}/main.test -importcfg {b}/importcfg.link -s -w -buildmode=exe "
                     f"-extld=gcc {b}/_testmain.a"),
            ("run", f"{b}/main.test -test.paniconexit0 -test.timeout={int(timeout)}s -test.count=1"),
        ]

    def command(self, root: str, timeout: float, go_test: str) -> str:
        """The shell command for one sample; ``go_test`` is the plain ``go test`` the generator
        hands the sample over to when it cannot prepare it exactly as go test would."""
        (_, generate), *build = self.steps(root, timeout)
        return f"if {generate}; then {' && '.join(command for _, command in build)}; else {go_test}; fi"


def _template_build(tmp: Path, env: dict[str, str], staging: Path, final: Path) -> dict:
    """``go test -x -work`` on a test importing every importable package; returns the config
    the generator reads: every package's export data and vet facts, and the link's import
    config, with the files outside GOROOT copied to ``staging/files`` (``@ROOT@`` stands for
    the cache dir as a sample sees it)."""
    listing = _go(["go", "list", "-e", "-f", "{{.ImportPath}} {{if or .Error .DepsErrors}}x{{end}}",
                   "std", "all"], env, tmp)
    packages = sorted(name for name, *error in (line.split(" ", 1) for line in listing.splitlines())
                      if not "".join(error).strip() and _importable(name))
    template = tmp / "template"
    template.mkdir()
    (template / "main_test.go").write_text(
        'package main\n\nimport (\n\t"testing"\n'
        + "".join(f'\t_ "{name}"\n' for name in packages if name != "testing")
        + ")\n\nfunc TestTemplate(t *testing.T) {}\n")
    res = subprocess.run(["go", "test", "-count=1", "-x", "-work", "main_test.go"], cwd=template,
                         env=env, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"go test of the template failed: {(res.stdout + res.stderr)[-300:]}")
    log = res.stderr
    found = re.search(r"^WORK=(\S+)$", log, re.M)
    if found is None:
        raise RuntimeError("go test -x printed no WORK directory")
    work = found.group(1)
    try:
        blocks = {path: text.replace("$WORK", work) for path, text in
                  re.findall(r"^cat >(\S+) << 'EOF' # internal\n(.*?)^EOF\n", log, re.M | re.S)}
        vet = next((json.loads(text) for path, text in blocks.items()
                    if path.endswith("vet.cfg") and '"ImportPath": "command-line-arguments"' in text), None)
        link = next((text for path, text in blocks.items() if path.endswith("importcfg.link")), None)
        if vet is None or link is None:
            raise RuntimeError("go test -x printed no vet.cfg or importcfg.link for the template")
        copies: dict[str, str] = {}

        def stable(path: str) -> str:
            # GOROOT's archives stay where they are; this run's outputs are copied.
            if path.startswith(work) or path.startswith(env["GOCACHE"]):
                if path not in copies:
                    name = f"files/{len(copies)}"
                    (staging / "files").mkdir(exist_ok=True)
                    shutil.copyfile(path, staging / name)
                    copies[path] = f"@ROOT@/{final.parent.name}/{final.name}/{name}"
                return copies[path]
            return path

        config: dict = {"packages": {}, "testmain": {}, "link": [], "modinfo": ""}
        for name, export in vet["PackageFile"].items():
            vetx = vet["PackageVetx"].get(name, "")
            config["packages"][name] = {"export": stable(export), "vetx": stable(vetx) if vetx else "",
                                        "standard": bool(vet["Standard"].get(name))}
        for line in link.splitlines():
            if line.startswith("packagefile ") and not line.startswith("packagefile command-line-arguments="):
                name, _, path = line[len("packagefile "):].partition("=")
                config["link"].append(f"packagefile {name}={stable(path)}")
            elif line.startswith("modinfo "):
                config["modinfo"] = line
        linked = dict(line[len("packagefile "):].partition("=")[::2] for line in config["link"])
        for name in ("os", "reflect", "testing", "testing/internal/testdeps"):  # the test main's
            if name not in linked:
                raise RuntimeError(f"the template's link config lacks {name}")
            config["testmain"][name] = linked[name]
        return config
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tree_state(root: str) -> str:
    """Names, sizes and modification times of the files under ``root`` (the GOPATH packages):
    an upgraded testify makes a new key, not stale export data."""
    entries = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            try:
                info = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue
            entries.append(f"{dirpath}/{name}:{info.st_size}:{info.st_mtime_ns}")
    return key_of(*sorted(entries))


def _importable(name: str) -> bool:
    parts = name.split("/")
    return "internal" not in parts and parts[0] not in ("vendor", "cmd")


def _go(argv: list[str], env: dict[str, str], cwd: Path) -> str:
    res = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed: {(res.stdout + res.stderr).strip()[-300:]}")
    return res.stdout
