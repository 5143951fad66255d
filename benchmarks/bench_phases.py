"""Benchmark: where a HumanEvalPack sample's time goes, per language and phase, reference vs accelerated.

For ``--problems`` canonical programs per language, each program runs in the real sandbox
twice -- with ``Sandbox(accelerated=False)`` (the reference: today's per-sample commands) and
with the default accelerated sandbox -- with its build split into phases that are timed inside
the sandbox (``date +%s%N`` between the steps; ``go test``'s own ``-debug-trace`` for Go, whose
phases happen inside one command; the warm javac's compile is timed around its request). The
``sandbox`` phase is the namespace setup and teardown around an empty command. Prints a markdown
table of median milliseconds per phase.

    .venv/bin/python benchmarks/bench_phases.py --problems 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from octoray.evaluation import humanevalpack as hep  # noqa: E402
from octoray.evaluation.sandbox.execution import CPP_STD, SANDBOX_ROOT, Sandbox, jvm_flags  # noqa: E402
from octoray.evaluation.sandbox.programs import build_program  # noqa: E402

STAMP = "echo @phase {index} $(date +%s%N)"

# Summarises `go test -debug-trace` inside the sandbox (the trace is the sample's own file).
_GO_TRACE = r"""
import json, sys
spans, open_ = {}, {}
for e in json.load(open(sys.argv[1])):
    key = (e.get("name"), e.get("tid"))
    if e["ph"] == "B":
        open_[key] = e["ts"]
    elif e["ph"] == "E" and key in open_:
        name, ms = key[0], (e["ts"] - open_.pop(key)) / 1000
        if name in ("load.PackagesAndErrors", "load.TestPackagesAndErrors"):
            phase = "load packages"
        elif not name.startswith("Executing action ("):
            continue
        elif "command-line-arguments" not in name:
            phase = "check dependencies"
        else:
            phase = {"build": "compile", "link": "link", "vet": "vet", "test": "run"}.get(name[18:].split()[0], "other")
        spans[phase] = spans.get(phase, 0) + ms
print("@go " + json.dumps(spans))
"""


def _phased(steps: list[tuple[str, str]]) -> str:
    """One shell command running ``steps`` (phase name, command) in order, stamping each."""
    parts = []
    for index, (_, command) in enumerate(steps):
        parts += [STAMP.format(index=index), command]
    return " && ".join(parts + [STAMP.format(index=len(steps))])


def _phases_from(tail: str, steps: list[tuple[str, str]]) -> dict[str, float]:
    stamps = [line.split() for line in tail.splitlines() if line.startswith("@phase ")]
    out: dict[str, float] = {}
    for (_, index, start), (_, _, end) in zip(stamps, stamps[1:]):
        out[steps[int(index)][0]] = (int(end) - int(start)) / 1e6
    for line in tail.splitlines():
        if line.startswith("@go "):
            out.update(json.loads(line[4:]))
    return out


def _steps(sb: Sandbox, language: str, root: str) -> list[tuple[str, str]]:
    """The sample's command, split into phases (same commands as Sandbox._command)."""
    if language in ("python", "js"):
        return [("run", sb._command(language, 60))]
    if language == "cpp":
        pch = f"-include {root}/{sb._cpp_header} " if sb._cpp_header else ""
        return [("compile", f"g++ {CPP_STD} {pch}-c test.cpp -o test.o"),
                ("link", "g++ test.o -lcrypto -lssl -o test"), ("run", "./test")]
    if language == "java":
        compile_cmd, run_cmd = sb._command("java", 60).split(" && ")
        return [("compile", compile_cmd), ("run", run_cmd)]
    if language == "rust":
        build, run = sb._command("rust", 60).split(" && ")
        return [("compile+link", build), ("run", run)]
    if language == "go" and sb._go_direct is not None:
        return sb._go_direct.steps(root, 60)
    if language == "go":
        trace = "go test -count=1 -timeout=60s -debug-trace=trace.json main_test.go"
        return [("go test", f"{trace} && {sys.executable} -c '{_GO_TRACE}' trace.json")]
    raise ValueError(language)


def _measure(sb: Sandbox, language: str, problem: dict) -> dict[str, float]:
    program = build_program(language, problem, problem["declaration"] + problem["canonical_solution"])
    root = SANDBOX_ROOT if sb.isolation != "none" else str(sb.cache_dir)
    if language == "java" and sb._java_compiler is not None:
        return _measure_warm_java(sb, program)
    steps = _steps(sb, language, root)
    status, tail = sb._execute_program(language, program.filename, program.source, 120, _phased(steps))
    if status != "pass":
        raise RuntimeError(f"{problem['task_id']}: {status}: {tail[-500:]}")
    phases = _phases_from(tail, steps)
    phases.pop("go test", None)  # its parts are in the trace
    return phases


def _measure_warm_java(sb: Sandbox, program) -> dict[str, float]:
    """The accelerated Java path, step by step as Sandbox._run_java takes it."""
    workdir = Path(tempfile.mkdtemp(prefix="java-", dir=sb.cache_dir / "work"))
    try:
        (workdir / program.filename).write_text(program.source)
        if sb.uid is not None:
            for path in (workdir, workdir / program.filename):
                os.chown(path, sb.uid, sb.uid)
        started = time.perf_counter()
        status, messages = sb._java_compiler.compile(workdir, 60)
        compile_ms = (time.perf_counter() - started) * 1000
        if status != "ok":
            raise RuntimeError(messages)
        steps = [("run", f"java {jvm_flags(1)} -cp . Main")]
        status, tail = sb._run("java", workdir, 60, _phased(steps))
        if status != "pass":
            raise RuntimeError(tail)
        return {"compile (warm javac)": compile_ms, **_phases_from(tail, steps)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _sandbox_overhead(sb: Sandbox, n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        sb._execute_program("python", "empty.txt", "", 60, "true")
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=20, help="canonical programs per language")
    parser.add_argument("--languages", default=",".join(hep.LANGUAGES))
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "humanevalpack"))
    args = parser.parse_args()

    languages = [x for x in args.languages.split(",") if x]
    with tempfile.TemporaryDirectory(prefix="bench-phases-") as tmp:
        sides = {"reference": Sandbox(cache_dir=Path(tmp), accelerated=False),
                 "accelerated": Sandbox(cache_dir=Path(tmp))}
        table: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for language in languages:
            problems = hep.load_problems(language, args.data_dir)[: args.problems]
            for sb in sides.values():
                problem = sb.toolchain_problem(language)
                if problem:
                    raise SystemExit(problem)
                _measure(sb, language, problems[0])  # per-process warm-up (Go cache copy, JIT)
            for problem in problems:
                for side, sb in sides.items():  # interleaved: load drifts hit both sides alike
                    for phase, ms in _measure(sb, language, problem).items():
                        table[(language, side)][phase].append(ms)
            print(f"measured {language}", file=sys.stderr, flush=True)
        overhead = {side: _sandbox_overhead(sb, 20) for side, sb in sides.items()}

    print(f"\nmedian ms per canonical program, {args.problems} per language; sandbox setup+teardown "
          f"around an empty command: reference {overhead['reference']:.0f} ms, accelerated "
          f"{overhead['accelerated']:.0f} ms\n")
    print("| language | path | phases (median ms) | sum of phases ms |")
    print("|---|---|---|---|")
    for (language, side), phases in table.items():
        medians = {phase: statistics.median(v) for phase, v in phases.items()}
        cells = ", ".join(f"{phase} {ms:.0f}" for phase, ms in medians.items())
        print(f"| {language} | {side} | {cells} | {sum(medians.values()):.0f} |")


if __name__ == "__main__":
    main()
