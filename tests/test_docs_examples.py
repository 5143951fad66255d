"""The docs' examples run as written, after the demo (issue 28).

Every fenced ``bash`` block of README.md and docs/*.md is run by ``bash -e`` as it stands in the
Markdown, in a scratch directory that looks like a checkout after ``make demo``: ``runs/`` (the
demo's outputs), ``jobs/``, and ``../shared`` beside it. A block that is too expensive, needs a
cloud, blocks until Ctrl-C or is run elsewhere carries, on the line before its fence,

    <!-- docs-test: skip (the reason) -->

and is skipped with that reason; nothing else is skipped, so a new example is run unless its
author says why not. The demo run is reused when ``runs/demo`` is complete (``make demo`` before
``make test``, as CI does), else made here with scripts/demo.sh and cheap settings.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, SHARED

SKIP = re.compile(r"^<!-- docs-test: skip \((?P<reason>[^)]+(?:\([^)]*\)[^)]*)*)\) -->$")
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def bash_blocks() -> list[tuple[str, str, str | None]]:
    """``(where, code, skip reason or None)`` for every fenced ``bash`` block of the docs."""
    found = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        fenced, start, body = False, 0, []
        for number, line in enumerate(lines, 1):
            if line.startswith("```") and not fenced:
                fenced, start, body, info = True, number, [], line[3:].strip()
            elif line.startswith("```") and fenced:
                fenced = False
                if info == "bash":
                    before = next((lines[i] for i in range(start - 2, -1, -1) if lines[i].strip()), "")
                    match = SKIP.match(before.strip())
                    found.append((f"{path.relative_to(REPO_ROOT)}:{start}", "\n".join(body) + "\n",
                                  match["reason"] if match else None))
            elif fenced:
                body.append(line)
    return found


def test_skip_markers_have_reasons_and_sit_before_a_bash_block() -> None:
    markers = [(path, number) for path in DOCS
               for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
               if line.lstrip().startswith("<!-- docs-test")]
    skipped = [where for where, _, reason in bash_blocks() if reason]
    assert len(markers) == len(skipped), "a docs-test marker that is malformed or not before a ```bash block"
    runnable = "\n".join(code for _, code, reason in bash_blocks() if reason is None)
    for example in ("octoray serve runs/demo/train/model", "octoray eval --generator hf:runs/demo/train/model",
                    "octoray eval --endpoint", "octoray eval --generator oracle:canonical", "octoray filter runs/demo"):
        assert example in runnable, f"no runnable docs example with {example!r}"


@pytest.fixture(scope="module")
def after_demo(tmp_path_factory) -> Path:
    """A directory laid out like the checkout after ``make demo``: runs/, jobs/ and ../shared."""
    demo = REPO_ROOT / "runs" / "demo"
    if not ((demo / "train" / "model" / "config.json").is_file() and (demo / "commits" / "manifest.json").is_file()):
        if not SHARED.is_dir():
            pytest.skip(f"reference data not found at {SHARED}")
        result = subprocess.run(["bash", "scripts/demo.sh", "train.max_steps=4", "eval.limit=1",
                                 "latency_requests=2"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=1200, env={**os.environ, "SHARED": str(SHARED)})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    root = tmp_path_factory.mktemp("docs")
    (root / "shared").symlink_to(SHARED)
    checkout = root / "checkout"
    checkout.mkdir()
    for name in ("runs", "jobs"):
        (checkout / name).symlink_to(REPO_ROOT / name)
    return checkout


@pytest.mark.ray
@pytest.mark.toolchain
@pytest.mark.slow
@pytest.mark.parametrize("where,code,reason", bash_blocks(), ids=[w for w, _, _ in bash_blocks()])
def test_docs_example_runs_as_written(where: str, code: str, reason: str | None, after_demo: Path) -> None:
    if reason:
        pytest.skip(f"{where}: {reason}")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(name, None)  # the examples start their own Ray, as on a newcomer's laptop
    # A session of its own: a server the block leaves behind is killed with it.
    proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", code], cwd=after_demo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, f"{where} failed ({proc.returncode}):\n{code}\n{out[-4000:]}"
    assert "Traceback" not in out, f"{where}:\n{out[-4000:]}"
