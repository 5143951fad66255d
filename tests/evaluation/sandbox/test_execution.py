"""Program assembly (fast) and oracle correctness per language (toolchain): canonical solutions
pass and buggy ones fail on a sample of HumanEvalPack problems. The full 164 x 6 check is
``benchmarks/oracle_check.py``."""

from __future__ import annotations

import json
import os
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

from octoray.evaluation.sandbox.execution import LANGUAGES, TIMEOUTS_S, ExecutionResult, Sandbox, wait_for_exit
from octoray.evaluation.sandbox.programs import build_program
from tests.helpers import REPO_ROOT
from tests.helpers.toolchains import registry_without

# Problems per language in the default run (Rust/32 and Rust/50 need rand 0.7: avoided).
SAMPLE = {"python": (0, 41, 82, 123, 163), "js": (0, 41, 82, 123, 163),
          "go": (0, 41, 82, 123, 163), "cpp": (0, 41, 82, 162, 163),
          "java": (10, 100, 162), "rust": (10, 100, 162)}


@lru_cache(maxsize=None)
def _problems(shared: Path, language: str) -> list[dict]:
    path = shared / "humanevalpack" / f"{language}.jsonl"
    return [json.loads(line) for line in path.open()]


# -- program assembly (no execution) -------------------------------------------------------------

GO_PROBLEM = {"test_setup": 'package main\n\nimport (\n    "testing"\n'
                            '    "github.com/stretchr/testify/assert"\n)\n',
              "test": "func TestF(t *testing.T) {\n    assert.Equal(t, 1, F())\n}\n"}


def test_go_adds_used_and_drops_unused_imports() -> None:
    code = ('import (\n    "strings"\n    "math"\n)\n\n'
            "// a list of strings.\nfunc F() int {\n    return int(math.Abs(-1))\n}\n")
    src = build_program("go", GO_PROBLEM, code).source
    assert '"strings"' not in src  # only named in a comment: Go would refuse the import
    assert src.count('"math"') == 1 and src.startswith("package main")
    src = build_program("go", GO_PROBLEM,
                        "func F() int {\n    return len(strconv.Itoa(7))\n}\n").source
    assert '"strconv"' in src
    src = build_program("go", GO_PROBLEM, "func F() int {\n    return rand.Intn(1) + 1\n}\n").source
    assert '"math/rand"' in src


def test_go_package_names_inside_other_names_are_not_uses() -> None:
    code = 'import (\n    "runtime"\n    "time"\n)\n\nfunc F() int {\n    return runtime.NumCPU()\n}\n'
    src = build_program("go", GO_PROBLEM, code).source
    assert '"time"' not in src and src.count('"runtime"') == 1  # runtime.X is not time.X
    src = build_program("go", GO_PROBLEM, "func F() int {\n    return runtime.NumCPU() + x.strings.Y\n}\n").source
    assert '"time"' not in src and '"strings"' not in src  # nothing to add for either


def test_go_gets_helpers_from_the_prompt() -> None:
    problem = {**GO_PROBLEM, "entry_point": "F",
               "prompt": "// helper\nfunc Helper() int {\n    return 1\n}\nfunc F() int {\n"}
    src = build_program("go", problem, "func F() int {\n    return Helper()\n}\n").source
    assert src.count("func Helper() int {") == 1
    src = build_program("go", problem, "func F() int {\n    return 1\n}\n").source
    assert "Helper" not in src  # not called: not added


def test_cpp_declaration_with_body_lines_is_not_repeated() -> None:
    # CPP/38: the declaration ends with the first lines of the body, which the solution repeats.
    decl = "int f(int x){\n    int y=x;\n    {\n"
    problem = {"declaration": decl, "test": "int main(){}"}
    code = decl + "    int y=x;\n    {\n    }\n    return y;\n}\n"
    src = build_program("cpp", problem, code).source
    assert src.count("int y=x;") == 1 and src.count("{") == src.count("}")


def test_rust_gets_main_and_missing_declaration_lines() -> None:
    problem = {"declaration": "\nuse rand::Rng;\nuse md5;\n\nfn f(x: i32) -> i32{\n", "test": ""}
    src = build_program("rust", problem, "use md5;\nfn f(x: i32) -> i32{\n    x\n}\n").source
    assert src.startswith("fn main(){}\nuse rand::Rng;\n")
    assert src.count("use md5;") == 1 and src.count("fn f(") == 1
    twice = "fn f(x: i32) -> i32{ x }\nfn main() {}\nfn main() {}\n"
    assert build_program("rust", problem, twice).source.count("fn main()") == 1  # 2nd cut off


def test_cpp_java_python_js_wrapping() -> None:
    cpp = build_program("cpp", {"test": "int main(){}"}, "int f(){return 1;}\nint main(){}").source
    assert cpp.startswith("using namespace std;") and cpp.count("int main") == 1
    java = build_program("java", {"test": "public class Main {}"},
                         "class Solution {}\npublic class Main {\n    }").source
    assert java.count("public class Main") == 1
    py = build_program("python", {"test": "check(f)"}, "def f(): pass").source
    assert py.startswith("import math") and py.endswith("def f(): pass\n\ncheck(f)")
    assert build_program("js", {"test": "t()"}, "const f = 1").source == "const f = 1\n\nt()"
    with pytest.raises(ValueError):
        build_program("cobol", {"test": ""}, "")


def test_timeouts_are_the_reference_ones() -> None:
    assert TIMEOUTS_S == {"python": 10, "js": 10, "java": 10, "go": 20, "cpp": 60, "rust": 300}
    assert set(TIMEOUTS_S) == set(LANGUAGES)


def test_wait_for_exit_reaps_exited_and_reports_timeouts() -> None:
    done = subprocess.Popen(["/bin/sh", "-c", "exit 3"])
    assert wait_for_exit(done, 30) is True and done.returncode == 3
    assert wait_for_exit(done, 30) is True  # already reaped: no pidfd, Popen knows the code
    hung = subprocess.Popen(["/bin/sh", "-c", "sleep 30"])
    try:
        assert wait_for_exit(hung, 0.2) is False and hung.returncode is None
    finally:
        hung.kill()
        hung.wait()


# -- oracle correctness (compilers and interpreters run) ----------------------------------------


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    # The default cache dir persists between runs: Rust deps / Go cache are built once per machine.
    return Sandbox()


@pytest.mark.toolchain
@pytest.mark.parametrize("language", LANGUAGES)
def test_oracle_canonical_passes_buggy_fails(sandbox: Sandbox, shared_dir: Path,
                                             language: str) -> None:
    problems = _problems(shared_dir, language)
    sandbox._toolchain_problem(language)  # warm-up (Rust deps, Go cache) is not a sample
    for idx in SAMPLE[language]:
        p = problems[idx]
        good = sandbox.execute(language, p, p["declaration"] + p["canonical_solution"])
        assert good.status == "pass", (p["task_id"], good.stderr_tail)
        bad = sandbox.execute(language, p, p["declaration"] + p["buggy_solution"])
        assert bad.status in ("fail", "timeout"), (p["task_id"], bad.stderr_tail)


@pytest.mark.toolchain
def test_compile_error_is_fail_and_unknown_language_is_error(sandbox: Sandbox,
                                                             shared_dir: Path) -> None:
    p = _problems(shared_dir, "go")[0]
    res = sandbox.execute("go", p, "func HasCloseElements(numbers []float64, threshold float64)"
                                   " bool {\n    return notDefined\n}\n")
    assert res.status == "fail" and "notDefined" in res.stderr_tail
    res = sandbox.execute("cobol", p, "")
    assert isinstance(res, ExecutionResult) and res.status == "error"


@pytest.mark.toolchain
def test_js_output_counts_as_failure(sandbox: Sandbox, shared_dir: Path) -> None:
    p = _problems(shared_dir, "js")[0]
    code = p["declaration"] + p["canonical_solution"]
    assert sandbox.execute("js", p, code).status == "pass"
    res = sandbox.execute("js", p, "console.log('hi');\n" + code)
    assert res.status == "fail" and "hi" in res.stderr_tail  # exit code 0, but it printed


@pytest.mark.toolchain
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a one-CPU machine starts one thread anyway")
def test_samples_keep_to_one_cpu(sandbox: Sandbox, shared_dir: Path) -> None:
    # Every Python program imports numpy (the reference's prelude); uncapped, OpenBLAS starts a
    # thread per core. Go sizes its scheduler from GOMAXPROCS.
    p = _problems(shared_dir, "python")[0]
    threads = "import os\nassert len(os.listdir('/proc/self/task')) == 1, os.listdir('/proc/self/task')\n"
    res = sandbox.execute("python", p, threads + p["declaration"] + p["canonical_solution"])
    assert res.status == "pass", res.stderr_tail
    g = _problems(shared_dir, "go")[0]
    procs = 'func init() {\n    if runtime.GOMAXPROCS(0) != 1 {\n        panic("GOMAXPROCS")\n    }\n}\n'
    code = 'import "runtime"\n' + g["declaration"] + g["canonical_solution"] + "\n" + procs
    res = sandbox.execute("go", g, code)
    assert res.status == "pass", res.stderr_tail


@pytest.mark.toolchain
def test_javac_maps_its_class_data_archive_inside_the_sandbox(sandbox: Sandbox,
                                                             shared_dir: Path) -> None:
    p = _problems(shared_dir, "java")[10]
    assert sandbox.execute("java", p, p["declaration"] + p["canonical_solution"]).status == "pass"
    assert sandbox._javac_archive and (sandbox.cache_dir / sandbox._javac_archive).is_file()
    # -Xshare:on turns "archive unusable" (wrong JVM, unreadable, bad path) into a VM error.
    strict = sandbox._command("java", 60).replace("javac ", "javac -J-Xshare:on ", 1)
    program = build_program("java", p, p["declaration"] + p["canonical_solution"])
    status, tail = sandbox._execute_program("java", program.filename, program.source, 60, strict)
    assert status == "pass", tail


# -- toolchain probe -------------------------------------------------------------------------------


@pytest.mark.toolchain
def test_toolchain_probe_names_the_crate_a_registry_lacks(tmp_path: Path, monkeypatch) -> None:
    from octoray.evaluation.sandbox import toolchains
    assert toolchains.toolchain_problem("rust") is None
    monkeypatch.setattr(toolchains, "DEBIAN_CARGO_REGISTRY", registry_without(tmp_path, "aho-corasick"))
    problem = toolchains.toolchain_problem("rust")
    assert problem is not None and "aho-corasick" in problem and "librust-regex+default-dev" in problem
    assert "\n" not in problem


@pytest.mark.toolchain
def test_install_script_check_fails_naming_the_missing_piece(tmp_path: Path) -> None:
    """``--check`` installs nothing and names what is missing: here js-md5, in a checkout that
    never ran the installer (the system toolchains it checks first are present on this machine)."""
    repo = REPO_ROOT
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "install_toolchains.sh").write_text(
        (repo / "scripts" / "install_toolchains.sh").read_text())
    result = subprocess.run(["bash", "scripts/install_toolchains.sh", "--check"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: js-md5 missing" in result.stderr
    assert not (tmp_path / ".toolchains").exists()  # --check installed nothing


# -- accelerated builds (precompiled C++ header, warm javac) ---------------------------------------

@pytest.mark.toolchain
def test_accelerated_builds_give_the_reference_verdicts(sandbox: Sandbox, shared_dir: Path) -> None:
    """The default (accelerated) sandbox against ``accelerated=False``, today's per-sample
    commands: the same verdict for canonical, buggy and non-compiling programs in every language."""
    reference = Sandbox(cache_dir=sandbox.cache_dir, accelerated=False)
    for language in LANGUAGES:
        problems = _problems(shared_dir, language)
        for idx in SAMPLE[language]:
            p = problems[idx]
            for code in (p["declaration"] + p["canonical_solution"],
                         p["declaration"] + p["buggy_solution"],
                         p["declaration"] + "this is not a program\n"):
                fast, slow = sandbox.execute(language, p, code), reference.execute(language, p, code)
                assert fast.status == slow.status, (p["task_id"], fast, slow)
    assert sandbox._java_compiler is not None and reference._java_compiler is None
    assert sandbox._cpp_header and reference._cpp_header is None


@pytest.mark.toolchain
def test_cpp_samples_use_the_precompiled_header_inside_the_sandbox(sandbox: Sandbox,
                                                                 shared_dir: Path) -> None:
    p = _problems(shared_dir, "cpp")[0]
    assert sandbox.execute("cpp", p, p["declaration"] + p["canonical_solution"]).status == "pass"
    assert (sandbox.cache_dir / f"{sandbox._cpp_header}.gch").is_file()
    # -H lists what g++ reads; a usable precompiled header is marked "!", an unusable one is an
    # error here instead of a silent fallback to the text header.
    strict = sandbox._command("cpp", 60).replace("g++ ", "g++ -H -Winvalid-pch -Werror=invalid-pch ", 1)
    program = build_program("cpp", p, p["declaration"] + p["canonical_solution"])
    status, tail = sandbox._execute_program("cpp", program.filename, program.source, 60, strict)
    assert status == "pass", tail
    assert any(line.startswith("! ") and line.endswith("header.h.gch") for line in tail.splitlines()), tail


@pytest.mark.toolchain
def test_warm_javac_reports_compile_errors_like_javac(sandbox: Sandbox, shared_dir: Path) -> None:
    p = _problems(shared_dir, "java")[0]
    res = sandbox.execute("java", p, p["declaration"] + "        return undefinedName;\n    }\n}\n")
    assert res.status == "fail" and "undefinedName" in res.stderr_tail
    # The program itself runs as before: an exception thrown by the test is a failure.
    res = sandbox.execute("java", p, p["declaration"] + p["buggy_solution"])
    assert res.status == "fail" and "AssertionError" in res.stderr_tail


@pytest.mark.toolchain
def test_warm_javac_restarts_after_a_timeout_or_a_dead_process(sandbox: Sandbox,
                                                               shared_dir: Path) -> None:
    p = _problems(shared_dir, "java")[0]
    good = p["declaration"] + p["canonical_solution"]
    assert sandbox.execute("java", p, good).status == "pass"
    compiler = sandbox._java_compiler
    # A compile that outlives its budget: the compiler is killed with its namespace...
    program = build_program("java", p, good)
    workdir = sandbox.cache_dir / "work" / "java-too-slow"
    workdir.mkdir(exist_ok=True)
    (workdir / program.filename).write_text(program.source)
    os.chmod(workdir, 0o777)
    assert compiler.compile(workdir, timeout=0.0)[0] == "timeout"
    assert compiler._proc is None
    # ... and the next sample gets a new one.
    res = sandbox.execute("java", p, good)
    assert res.status == "pass", res
    # A compiler process that died between samples is replaced too.
    os.killpg(compiler._proc.pid, 9)
    compiler._proc.wait()
    assert sandbox.execute("java", p, good).status == "pass"
    assert sandbox._java_compiler is compiler


GO_EXTRA = {  # case -> (imports before the code, code after the solution, go test's verdict)
    # go test's vet (printf) fails a program whose tests pass
    "vet": ("", 'func Extra() string {\n    return fmt.Sprintf("%d", "text")\n}\n', "fail"),
    # an example with the wrong output fails; one with the right output passes
    "example_wrong": ("", 'func ExampleExtra() {\n    fmt.Println("a")\n    // Output: b\n}\n', "fail"),
    "example_right": ("", 'func ExampleExtra() {\n    fmt.Println("a")\n    // Output: a\n}\n', "pass"),
    # TestMain decides the exit code
    "testmain": ('import "os"\n', "func TestMain(m *testing.M) {\n    os.Exit(3)\n}\n", "fail"),
    # a package go test cannot find, and a test function with a wrong signature: left to go test
    "unknown_import": ('import "example.com/nothing"\n', "var _ = nothing.X\n", "fail"),
    "bad_signature": ("", "func TestExtra(x int) {}\n", "fail"),
    # go test refuses an internal package the test main itself imports; //go:embed needs go test
    "internal_import": ('import "testing/internal/testdeps"\n', "var _ = testdeps.ImportPath\n", "fail"),
    "embed": ('import _ "embed"\n', "//go:embed main_test.go\nvar self string\n", "pass"),
}


@pytest.mark.toolchain
@pytest.mark.parametrize("case", sorted(GO_EXTRA))
def test_go_without_go_test_gives_go_tests_verdicts(sandbox: Sandbox, shared_dir: Path,
                                                    case: str) -> None:
    reference = Sandbox(cache_dir=sandbox.cache_dir, accelerated=False)
    p = _problems(shared_dir, "go")[0]
    imports, extra, expected = GO_EXTRA[case]
    code = imports + p["declaration"] + p["canonical_solution"] + "\n" + extra
    fast, slow = sandbox.execute("go", p, code), reference.execute("go", p, code)
    assert sandbox._go_direct is not None
    assert (fast.status, slow.status) == (expected, expected), (fast, slow)
