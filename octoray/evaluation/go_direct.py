"""Go samples built by the Go tools directly, not through ``go test``: 0.3 s less per sample.

``go test main_test.go`` spends most of a HumanEvalPack sample on work that is the same for
every sample: loading and hashing the ~150 packages testify pulls in (net/http, yaml, ...) to
decide that nothing needs rebuilding, before it compiles the sample's package, vets it, writes
and compiles a ``_testmain.go``, links and runs the test binary. This module does the shared part
once per cache dir and Go installation: it builds a template test that imports every importable
package (the standard library and the GOPATH packages) with ``go test -x -work``, and keeps what
that run produced and printed -- the export data and vet facts of every package, the link's
import config -- plus a small generator of ours (Go, built here from :data:`GENERATOR_SOURCE`).

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

from octoray.evaluation.shared_builds import build_lock, key_of

# cmd/go's defaultVetFlags (go1.19 cmd/go/internal/test/test.go): the analyzers go test runs.
VET_FLAGS = "-atomic -bool -buildtags -errorsas -ifaceassert -nilfunc -printf -stringintconv"
BUILD_DIR = "go-build-octoray"  # in the sample's directory, as go test's own $GOTMPDIR/go-build*
CONFIG = "direct.json"
GENERATOR = "octoray-gotest"

GENERATOR_SOURCE = r"""// Prepares one HumanEvalPack Go sample for building without the go command: reads the sample's
// test file and writes what `go test` would derive from it -- the import configs, vet.cfg and
// _testmain.go -- following cmd/go (go1.19: load/test.go, work/exec.go). Exit 0: OUTDIR is ready;
// exit 3: something only `go test` itself handles (parse errors, cgo, unknown imports, test
// functions with wrong signatures, ...): the caller runs `go test`.
package main

import (
	"encoding/json"
	"fmt"
	"go/ast"
	"go/doc"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

const useGoTest = 3

type pkg struct {
	Export   string `json:"export"`
	Vetx     string `json:"vetx"`
	Standard bool   `json:"standard"`
}

type config struct {
	Packages map[string]pkg    `json:"packages"` // what a sample may import
	Testmain map[string]string `json:"testmain"` // the test main's imports -> export data
	Link     []string          `json:"link"`
	Modinfo  string            `json:"modinfo"`
}

type testFunc struct {
	Name, Output string
	Unordered    bool
}

func main() {
	if len(os.Args) != 5 {
		fmt.Fprintln(os.Stderr, "usage: octoray-gotest CONFIG ROOT FILE OUTDIR")
		os.Exit(2)
	}
	cfgPath, root, file, out := os.Args[1], os.Args[2], os.Args[3], os.Args[4]
	raw, err := os.ReadFile(cfgPath)
	check(err)
	var cfg config
	check(json.Unmarshal([]byte(strings.ReplaceAll(string(raw), "@ROOT@", root)), &cfg))

	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, file, nil, parser.ParseComments)
	if err != nil || strings.HasSuffix(f.Name.Name, "_test") {
		os.Exit(useGoTest)
	}
	imports := map[string]pkg{}
	for _, spec := range f.Imports {
		path, err := strconv.Unquote(spec.Path.Value)
		known, ok := cfg.Packages[path]
		if err != nil || !ok || path == "embed" {
			os.Exit(useGoTest) // "C" (cgo), a missing package, a local import, //go:embed ...
		}
		imports[path] = known
	}
	tests, examples, testMain, ok := testFuncs(f)
	if !ok {
		os.Exit(useGoTest)
	}
	importTest := len(tests) > 0 || len(examples) > 0 || testMain || hasExamples(f)

	check(os.MkdirAll(out, 0o755))
	paths := sortedKeys(imports)
	var compileCfg, testmainCfg, linkCfg strings.Builder
	compileCfg.WriteString("# import config\n")
	for _, p := range paths {
		fmt.Fprintf(&compileCfg, "packagefile %s=%s\n", p, imports[p].Export)
	}
	testmainCfg.WriteString("# import config\n")
	for _, p := range []string{"os", "reflect", "testing", "testing/internal/testdeps"} {
		fmt.Fprintf(&testmainCfg, "packagefile %s=%s\n", p, cfg.Testmain[p])
	}
	self := filepath.Join(out, "_pkg_.a")
	if importTest {
		fmt.Fprintf(&testmainCfg, "packagefile command-line-arguments=%s\n", self)
	}
	linkCfg.WriteString("# import config\n")
	for _, line := range cfg.Link {
		linkCfg.WriteString(line + "\n")
	}
	fmt.Fprintf(&linkCfg, "packagefile command-line-arguments=%s\n%s\n", self, cfg.Modinfo)

	vet := map[string]any{
		"ID": "command-line-arguments", "Compiler": "gc", "Dir": filepath.Dir(file),
		"ImportPath": "command-line-arguments", "GoFiles": []string{file},
		"NonGoFiles": []string{}, "IgnoredFiles": []string{},
		"ImportMap": map[string]string{}, "PackageFile": map[string]string{},
		"Standard": map[string]bool{}, "PackageVetx": map[string]string{},
		"VetxOnly": false, "VetxOutput": filepath.Join(out, "vet.out"),
		"SucceedOnTypecheckFailure": false,
	}
	for _, p := range paths {
		vet["ImportMap"].(map[string]string)[p] = p
		vet["PackageFile"].(map[string]string)[p] = imports[p].Export
		if imports[p].Standard {
			vet["Standard"].(map[string]bool)[p] = true
		}
		if imports[p].Vetx != "" {
			vet["PackageVetx"].(map[string]string)[p] = imports[p].Vetx
		}
	}
	vetJSON, err := json.MarshalIndent(vet, "", "\t")
	check(err)

	write(filepath.Join(out, "importcfg"), compileCfg.String())
	write(filepath.Join(out, "importcfg.testmain"), testmainCfg.String())
	write(filepath.Join(out, "importcfg.link"), linkCfg.String())
	write(filepath.Join(out, "vet.cfg"), string(vetJSON)+"\n")
	write(filepath.Join(out, "_testmain.go"), testmain(tests, examples, testMain, importTest))
}

// testFuncs follows cmd/go's testFuncs.load for one in-package test file; ok is false where
// go test reports an error (wrong signature, two TestMains).
func testFuncs(f *ast.File) (tests, examples []testFunc, testMain, ok bool) {
	for _, d := range f.Decls {
		n, isFunc := d.(*ast.FuncDecl)
		if !isFunc || n.Recv != nil {
			continue
		}
		name := n.Name.String()
		switch {
		case name == "TestMain":
			if isTestFunc(n, "T") {
				tests = append(tests, testFunc{Name: name})
				continue
			}
			if !validSignature(n, "M") || testMain {
				return nil, nil, false, false
			}
			testMain = true
		case isTest(name, "Test"):
			if !validSignature(n, "T") {
				return nil, nil, false, false
			}
			tests = append(tests, testFunc{Name: name})
		case isTest(name, "Benchmark"), isTest(name, "Fuzz"):
			// Listed by go test but never run without -bench/-fuzz; checked like tests.
			arg := map[bool]string{true: "B", false: "F"}[isTest(name, "Benchmark")]
			if !validSignature(n, arg) {
				return nil, nil, false, false
			}
			return nil, nil, false, false // rare in samples: leave them to go test
		}
	}
	ex := doc.Examples(f)
	sort.Slice(ex, func(i, j int) bool { return ex[i].Order < ex[j].Order })
	for _, e := range ex {
		if e.Output == "" && !e.EmptyOutput {
			continue // compiled, not run
		}
		examples = append(examples, testFunc{"Example" + e.Name, e.Output, e.Unordered})
	}
	return tests, examples, testMain, true
}

func hasExamples(f *ast.File) bool { return len(doc.Examples(f)) > 0 }

func validSignature(fn *ast.FuncDecl, arg string) bool {
	return isTestFunc(fn, arg) && fn.Type.TypeParams.NumFields() == 0
}

func isTestFunc(fn *ast.FuncDecl, arg string) bool {
	if fn.Type.Results != nil && len(fn.Type.Results.List) > 0 ||
		fn.Type.Params.List == nil || len(fn.Type.Params.List) != 1 ||
		len(fn.Type.Params.List[0].Names) > 1 {
		return false
	}
	ptr, ok := fn.Type.Params.List[0].Type.(*ast.StarExpr)
	if !ok {
		return false
	}
	if name, ok := ptr.X.(*ast.Ident); ok && name.Name == arg {
		return true
	}
	sel, ok := ptr.X.(*ast.SelectorExpr)
	return ok && sel.Sel.Name == arg
}

func isTest(name, prefix string) bool {
	if !strings.HasPrefix(name, prefix) {
		return false
	}
	if len(name) == len(prefix) {
		return true
	}
	r, _ := utf8.DecodeRuneInString(name[len(prefix):])
	return !unicode.IsLower(r)
}

// testmain is go1.19's _testmain.go for a package with in-package tests only, no coverage.
func testmain(tests, examples []testFunc, testMain, importTest bool) string {
	var b strings.Builder
	b.WriteString("// Code generated by 'go test'. DO NOT EDIT.\n\npackage main\n\nimport (\n\t\"os\"\n")
	if testMain {
		b.WriteString("\t\"reflect\"\n")
	}
	b.WriteString("\t\"testing\"\n\t\"testing/internal/testdeps\"\n")
	if importTest {
		alias := "_"
		if len(tests) > 0 || len(examples) > 0 || testMain {
			alias = "_test"
		}
		fmt.Fprintf(&b, "\t%s \"command-line-arguments\"\n", alias)
	}
	b.WriteString(")\n\nvar tests = []testing.InternalTest{\n")
	for _, t := range tests {
		fmt.Fprintf(&b, "\t{%q, _test.%s},\n", t.Name, t.Name)
	}
	b.WriteString("}\n\nvar benchmarks = []testing.InternalBenchmark{\n}\n\n")
	b.WriteString("var fuzzTargets = []testing.InternalFuzzTarget{\n}\n\n")
	b.WriteString("var examples = []testing.InternalExample{\n")
	for _, e := range examples {
		fmt.Fprintf(&b, "\t{%q, _test.%s, %q, %t},\n", e.Name, e.Name, e.Output, e.Unordered)
	}
	b.WriteString("}\n\nfunc init() {\n\ttestdeps.ImportPath = \"\"\n}\n\nfunc main() {\n")
	b.WriteString("\tm := testing.MainStart(testdeps.TestDeps{}, tests, benchmarks, fuzzTargets, examples)\n")
	if testMain {
		b.WriteString("\t_test.TestMain(m)\n\tos.Exit(int(reflect.ValueOf(m).Elem().FieldByName(\"exitCode\").Int()))\n")
	} else {
		b.WriteString("\tos.Exit(m.Run())\n")
	}
	b.WriteString("}\n")
	return b.String()
}

func sortedKeys(m map[string]pkg) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func write(path, text string) { check(os.WriteFile(path, []byte(text), 0o644)) }

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "octoray-gotest:", err)
		os.Exit(useGoTest)
	}
}
"""


def build(cache_dir: Path, env: dict[str, str]) -> str:
    """Build the shared part once per cache dir and Go installation (under a file lock; ``env``
    is the Go environment of the samples, GOPATH mode). Returns its directory relative to
    ``cache_dir``. Raises RuntimeError (or OSError/SubprocessError) when any step fails."""
    version = _go(["go", "version"], env, cache_dir).strip()
    tooldir = _go(["go", "env", "GOTOOLDIR"], env, cache_dir).strip()
    relative = f"go-direct/{key_of(version, tooldir, _tree_state(env['GOPATH']), GENERATOR_SOURCE)}"
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
            (Path(tmp) / "gen.go").write_text(GENERATOR_SOURCE)
            _go(["go", "build", "-o", str(staging / GENERATOR), "gen.go"], build_env, Path(tmp))
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
