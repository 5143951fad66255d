"""Per-sample cost of the execution sandbox vs the reference harness's way of running samples.

    .venv/bin/python benchmarks/bench_execution.py [--problems 5] [--languages python,...]

Baseline ("reference"): what bigcode-evaluation-harness ``code_eval_octopack`` does -- an
unsandboxed subprocess per sample in a temp dir with the reference's commands (python/node
direct; ``javac`` + ``java``; ``go test`` with a shared warm build cache; ``g++ -std=c++11``;
Rust: one shared cargo project, ``cargo check --bin test`` then ``cargo test --bin test``, deps
prebuilt). Ours: :meth:`Sandbox.execute` (namespaces, rlimits, uid drop, Rust via plain
``rustc --test`` against prebuilt rlibs). Both run the canonical solution of the same problems,
interleaved sample by sample so machine load hits both alike; one-time warm-ups are excluded.
Prints a markdown table of median seconds per sample.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from octoray.evaluation.sandbox import toolchains  # noqa: E402
from octoray.evaluation.sandbox.execution import LANGUAGES, Sandbox  # noqa: E402
from octoray.evaluation.sandbox.programs import build_program  # noqa: E402


class Reference:
    """Reference-harness style runner: plain subprocesses, no isolation."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.gocache = work / "go-build"
        self.rust = work / "rust"
        (self.rust / "src" / "bin").mkdir(parents=True, exist_ok=True)
        (self.rust / "Cargo.toml").write_text(
            '[package]\nname = "rust"\nversion = "0.1.0"\nedition = "2021"\n\n[dependencies]\n'
            + "".join(f'{k} = "{v}"\n' for k, v in toolchains.RUST_DEPS.items()))
        home = work / "cargo-home"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            '[source.crates-io]\nreplace-with = "debian"\n\n'
            f'[source.debian]\ndirectory = "{toolchains.DEBIAN_CARGO_REGISTRY}"\n')
        self.env = {**os.environ, "CARGO_HOME": str(home), "GO111MODULE": "off",
                    "GOPATH": toolchains.GOPATH, "GOCACHE": str(self.gocache),
                    "NODE_PATH": str(toolchains.NODE_MODULES)}

    def run(self, language: str, problem: dict, code: str) -> bool:
        program = build_program(language, problem, code)
        if language == "rust":
            (self.rust / "src" / "bin" / "test.rs").write_text(program.source)
            ok = self._sh(["cargo", "check", "--offline", "--bin", "test", "-q"], self.rust)
            return ok and self._sh(["cargo", "test", "--offline", "--bin", "test", "-q"], self.rust)
        with tempfile.TemporaryDirectory(dir=self.work) as tmp:
            Path(tmp, program.filename).write_text(program.source)
            cmds = {"python": [[sys.executable, "test.py"]], "js": [["node", "test.js"]],
                    "java": [["javac", "Main.java"], ["java", "-cp", ".", "Main"]],
                    "go": [["go", "test", "-count=1", "main_test.go"]],
                    "cpp": [["g++", "-std=c++11", "test.cpp", "-lcrypto", "-lssl"], ["./a.out"]]}
            return all(self._sh(cmd, Path(tmp)) for cmd in cmds[language])

    def _sh(self, cmd: list[str], cwd: Path) -> bool:
        return subprocess.run(cmd, cwd=cwd, env=self.env, capture_output=True,
                              timeout=600).returncode == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "humanevalpack"))
    ap.add_argument("--languages", default=",".join(LANGUAGES))
    ap.add_argument("--problems", type=int, default=5)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-exec-") as tmp:
        ref, sandbox = Reference(Path(tmp)), Sandbox(cache_dir=Path(tmp) / "sandbox")
        for lang in args.languages.split(","):
            problems = [json.loads(line) for line in
                        (Path(args.data_dir) / f"{lang}.jsonl").open()][: args.problems + 1]
            warm, *problems = problems
            code = warm["declaration"] + warm["canonical_solution"]
            t0 = time.monotonic()
            ref.run(lang, warm, code)  # reference warm-up: cargo deps, go cache
            t_ref_warm = time.monotonic() - t0
            t0 = time.monotonic()
            sandbox._toolchain_problem(lang)  # ours: rust rlibs, go cache template
            sandbox.execute(lang, warm, code)
            t_box_warm = time.monotonic() - t0
            t_ref, t_box, ok_ref, ok_box = [], [], 0, 0
            for p in problems:
                code = p["declaration"] + p["canonical_solution"]
                t0 = time.monotonic()
                ok_ref += ref.run(lang, p, code)
                t_ref.append(time.monotonic() - t0)
                t0 = time.monotonic()
                ok_box += sandbox.execute(lang, p, code).status == "pass"
                t_box.append(time.monotonic() - t0)
            rows.append((lang, len(problems), statistics.median(t_ref), statistics.median(t_box),
                         ok_ref, ok_box, t_ref_warm, t_box_warm))
            print(f"{lang}: done", file=sys.stderr)
    print(f"\nsandbox isolation: {sandbox.isolation}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| language | samples | reference s/sample (median) | octoray sandbox s/sample (median) "
          "| ratio | passed ref / ours | first-sample warm-up ref / ours (s) |")
    print("|---|---|---|---|---|---|---|")
    for lang, n, r, b, okr, okb, wr, wb in rows:
        print(f"| {lang} | {n} | {r:.2f} | {b:.2f} | {b / r:.2f}x | {okr}/{n} / {okb}/{n} "
              f"| {wr:.1f} / {wb:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
