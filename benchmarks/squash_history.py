"""CommitPackFT yield on a squash-merge history: the filter funnel with subject normalisation off
(the paper's rules, ``pr_suffix=keep emoji_prefix=keep``) and on (octoray's default), side by side.

    .venv/bin/python benchmarks/squash_history.py [--commits 4000] [--repo PATH] [--work DIR]

Without ``--repo`` it builds, offline with ``git fast-import``, a history shaped like today's
GitHub projects (trl, torchtune, litgpt, axolotl): most subjects are squash-merged pull requests
ending in ``(#123)``, some start with a gitmoji (``🐛``, ``:sparkles:``), some are Dependabot
bumps, conventional-commit prefixes, direct pushes, releases and issue references; about half the
commits change one file (Python from this interpreter's standard library, plus docs, YAML, JS/TS,
Go, Rust, C++, Java and shell), the rest several. Then it runs ``octoray mine`` and two
``octoray filter`` runs through the CLI, as a user would, and prints both funnels as a Markdown
table. Rule 8 (tokens) is off: no hub tokenizer can be downloaded offline, and it does not read
the subject, so it changes both columns alike.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

#: Imperative phrases of the kind squash-merged PR titles carry.
VERBS = ("Fix", "Add", "Remove", "Support", "Improve", "Handle", "Allow", "Make", "Use", "Refactor",
         "Rename", "Move", "Speed up", "Avoid", "Document", "Drop", "Expose", "Clarify", "Deprecate",
         "Update", "Validate", "Cache", "Simplify", "Enable", "Skip", "Log", "Set", "Load", "Pin", "Replace")
OBJECTS = ("padding side in the tokenizer", "gradient checkpointing with DeepSpeed ZeRO-3",
           "the deprecated `max_seq_length` argument", "empty batches in the data collator",
           "the chat template when the model has one", "`torch.compile` in the training loop",
           "the error message for missing dataset columns", "a custom reward function in the config",
           "the reference model when PEFT is used", "logging of the learning rate every step",
           "packing of short sequences", "generation with a static KV cache", "the LoRA section of the docs",
           "support for Python 3.8", "`num_generations` in the command line", "loss scaling for bf16 runs",
           "the quickstart example in the README", "the pad token when the tokenizer lacks one",
           "flaky tests on CPU runners", "the evaluation loop for multi-GPU runs", "the checkpoint resume logic",
           "the vLLM colocation mode", "the Liger kernel integration", "memory usage of the reward model",
           "a warning when `eos_token` is missing", "the dataset formatting helpers", "the CI matrix for nightly torch",
           "type hints in the trainer config", "the default learning rate scheduler",
           "KL estimation in the online trainer", "mixed precision on Apple silicon", "the model card template")
TAGS = ("DPO", "GRPO", "SFT", "PPO", "docs", "CI", "CLI", "vLLM", "PEFT", "tests")
CONVENTIONAL = ("fix", "feat", "docs", "chore", "refactor", "test", "ci")
GITMOJI = ("🐛", "✨", "📝", "♻️", "⚡️", "🔥", "✅", "🚀", "🩹", "🔧", "⬆️", "🏷️", "👷", "🧪", "💡", "🎨",
           "🧑‍💻", "🔒️", "🚑️", "➕")
SHORTCODES = ("bug", "sparkles", "memo", "recycle", "zap", "fire", "white_check_mark", "rocket", "wrench",
              "arrow_up", "art", "construction_worker")
PACKAGES = ("actions/checkout", "actions/setup-python", "transformers", "accelerate", "torch", "pytest",
            "ruff", "datasets", "peft", "deepspeed", "black", "codecov/codecov-action")
DIRECT = ("update readme", "fix typo", "WIP", "Fix tests", "minor fixes", "Update docs", "cleanup",
          "Fixed the CI config for the nightly job", "Adding more tests for the trainer", "format code")

# (weight, style): how a commit's subject is written. The mix follows the share of squash-merged,
# gitmoji-prefixed and other subjects in the issue's measurements (most subjects end in "(#N)").
STYLES = ((48, "squash"), (8, "tag_squash"), (6, "conventional_squash"), (11, "emoji_squash"),
          (3, "shortcode_squash"), (2, "emoji_plain"), (4, "bump"), (1, "dev_bump"), (1, "multi_paren"),
          (1, "multi_comma"), (0.5, "bracket"), (0.5, "gh"), (0.5, "gitlab"), (5, "plain"), (3, "direct"),
          (2, "hash_elsewhere"), (1, "closes"), (1, "release"), (2, "past_tense"), (2, "file_name"),
          (8, "lower_squash"), (6, "noun_squash"), (3, "short_squash"))

SINGLE_FILE_SHARE = 0.5
#: File kinds of single-file commits (weight, extension).
KINDS = ((62, ".py"), (8, ".md"), (5, ".yml"), (4, ".js"), (3, ".ts"), (4, ".go"), (4, ".rs"), (4, ".cpp"),
         (3, ".java"), (3, ".sh"))


def subject_for(style: str, rng: random.Random, pr: int, stem: str) -> str:
    """One realistic subject in ``style`` for pull request number ``pr`` touching ``stem``."""
    phrase = f"{rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    lower = phrase[0].lower() + phrase[1:]
    version = f"{rng.randint(0, 4)}.{rng.randint(0, 30)}.{rng.randint(0, 9)}"
    return {
        "squash": f"{phrase} (#{pr})",
        "tag_squash": f"[{rng.choice(TAGS)}] {phrase} (#{pr})",
        "conventional_squash": f"{rng.choice(CONVENTIONAL)}: {lower} (#{pr})",
        "emoji_squash": f"{rng.choice(GITMOJI)} {phrase} (#{pr})",
        "shortcode_squash": f":{rng.choice(SHORTCODES)}: {phrase} (#{pr})",
        "emoji_plain": f"{rng.choice(GITMOJI)} {phrase}",
        "bump": f"Bump {rng.choice(PACKAGES)} from {version} to {version[:-1]}{int(version[-1]) + 1} (#{pr})",
        "dev_bump": f"⬆️ Bump dev version (#{pr})",
        "multi_paren": f"{phrase} (#{pr - rng.randint(1, 40)}) (#{pr})",
        "multi_comma": f"{phrase} (#{pr - rng.randint(1, 40)}, #{pr})",
        "bracket": f"{phrase} [#{pr}]",
        "gh": f"{phrase} (GH-{pr})",
        "gitlab": f"{phrase} (!{pr})",
        "plain": phrase,
        "direct": rng.choice(DIRECT),
        "hash_elsewhere": f"Fix #{pr - rng.randint(5, 200)}: {lower} (#{pr})",
        "closes": f"{phrase}, closes #{pr - rng.randint(5, 200)}",
        "release": rng.choice((f"Release v{version}", f"v{version}", f"🏷️ Release v{version} (#{pr})")),
        "past_tense": f"{rng.choice(('Fixed', 'Added', 'Removed', 'Improved', 'Updated'))} {rng.choice(OBJECTS)} (#{pr})",
        "file_name": f"{rng.choice(('Update', 'Fix', 'Refactor'))} {stem} for the new API (#{pr})",
        "lower_squash": f"{lower} (#{pr})",
        "noun_squash": rng.choice((f"Better {rng.choice(OBJECTS)} (#{pr})", f"New {rng.choice(TAGS)} example (#{pr})",
                                   f"{rng.choice(TAGS)} support for {rng.choice(OBJECTS)} (#{pr})",
                                   f"Faster {rng.choice(OBJECTS)} (#{pr})", f"Minor fixes to {rng.choice(OBJECTS)} (#{pr})")),
        "short_squash": rng.choice((f"Fix typo (#{pr})", f"Update docs (#{pr})", f"Fix CI (#{pr})",
                                    f"{rng.choice(GITMOJI)} Fix tests (#{pr})")),
    }[style]


def _generated_source(ext: str, i: int, rng: random.Random) -> list[str]:
    """A small source file in the language of ``ext`` (a few functions, ~40-120 lines)."""
    lines: list[str] = []
    for f in range(rng.randint(4, 12)):
        name, k = f"step_{i}_{f}", rng.randint(1, 99)
        body = {
            ".js": [f"export function {name}(items) {{", f"  const limit = {k};",
                    "  return items.filter((x) => x < limit).map((x) => x * 2);", "}"],
            ".ts": [f"export function {name}(items: number[]): number[] {{", f"  const limit = {k};",
                    "  return items.filter((x) => x < limit).map((x) => x * 2);", "}"],
            ".go": [f"func {name.title().replace('_', '')}(items []int) []int {{", f"\tlimit := {k}",
                    "\tout := []int{}", "\tfor _, x := range items {", "\t\tif x < limit {",
                    "\t\t\tout = append(out, x*2)", "\t\t}", "\t}", "\treturn out", "}"],
            ".rs": [f"pub fn {name}(items: &[i64]) -> Vec<i64> {{", f"    let limit = {k};",
                    "    items.iter().filter(|x| **x < limit).map(|x| x * 2).collect()", "}"],
            ".cpp": [f"std::vector<int> {name}(const std::vector<int>& items) {{", f"    const int limit = {k};",
                     "    std::vector<int> out;", "    for (int x : items) if (x < limit) out.push_back(x * 2);",
                     "    return out;", "}"],
            ".java": [f"    static int[] {name}(int[] items) {{", f"        final int limit = {k};",
                      "        return java.util.Arrays.stream(items).filter(x -> x < limit).map(x -> x * 2).toArray();",
                      "    }"],
            ".sh": [f"{name}() {{", f"  local limit={k}", "  for x in \"$@\"; do", "    if [ \"$x\" -lt \"$limit\" ]; then",
                    "      echo $((x * 2))", "    fi", "  done", "}"],
            ".md": [f"## Step {f}", "", f"Set `limit` to {k} to keep only the small items; the rest are skipped.", ""],
            ".yml": [f"{name}:", f"  limit: {k}", "  enabled: true", f"  name: step-{f}"],
        }[ext]
        lines += [line + "\n" for line in body] + ["\n"]
    if ext == ".java":
        lines = [f"class Steps{i} {{\n", *lines, "}\n"]
    if ext == ".sh":
        lines = ["#!/bin/sh\n", *lines]
    return lines


def build_repo(path: Path, n_commits: int, seed: int = 0) -> Path:
    """A squash-merge-style history of ``n_commits`` commits, via ``git fast-import``."""
    rng = random.Random(seed)
    stdlib = [p for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
              if 2_000 < p.stat().st_size < 40_000][:200]
    files: dict[str, list[str]] = {f"src/pkg/{p.name}": p.read_text(encoding="utf-8", errors="replace")
                                   .splitlines(keepends=True) for p in stdlib}
    dirs = {".md": "docs", ".yml": "configs", ".js": "web/src", ".ts": "web/src", ".go": "cmd/tool",
            ".rs": "native/src", ".cpp": "csrc", ".java": "java/src", ".sh": "scripts"}
    for ext, folder in dirs.items():
        for i in range(12):
            stem = f"Steps{i}" if ext == ".java" else f"steps_{i}"
            files[f"{folder}/{stem}{ext}"] = _generated_source(ext, i, rng)
    by_ext: dict[str, list[str]] = {}
    for name in files:
        by_ext.setdefault(Path(name).suffix, []).append(name)

    stream: list[bytes] = []

    def blob(text: str) -> bytes:
        data = text.encode()
        return b"data %d\n%s\n" % (len(data), data)

    def commit(mark: int, message: str, ops: list[bytes]) -> None:
        stamp = 1_609_459_200 + mark * 40_000  # from 2021 on, ~11 hours apart
        stream.append(b"commit refs/heads/main\nmark :%d\n" % mark)
        stream.append(b"author Dev <dev@example.com> %d +0000\n" % stamp)
        stream.append(b"committer GitHub <noreply@github.com> %d +0000\n" % stamp)
        stream.append(blob(message)[:-1] + b"\n")
        if mark > 1:
            stream.append(b"from :%d\n" % (mark - 1))
        stream.extend(ops)
        stream.append(b"\n")

    def edit(name: str, mark: int) -> bytes:
        lines = files[name]
        i = rng.randrange(len(lines)) if lines else 0
        comment = {".py": "#", ".sh": "#", ".yml": "#", ".md": "<!--"}.get(Path(name).suffix, "//")
        end = " -->" if comment == "<!--" else ""
        if rng.random() < 0.3 and len(lines) > 20:
            del lines[i]
        else:
            lines.insert(i, f"{comment} revised in change {mark}{end}\n")
        return b"M 100644 inline %s\n" % name.encode() + blob("".join(lines))

    mit = ("MIT License\n\nCopyright (c) 2021 The Authors\n\nPermission is hereby granted, free of charge, to any "
           "person obtaining a copy of this software and associated documentation files (the \"Software\"), to "
           "deal in the Software without restriction.\n")
    ops = [b"M 100644 inline LICENSE\n" + blob(mit)]
    ops += [b"M 100644 inline %s\n" % name.encode() + blob("".join(lines)) for name, lines in files.items()]
    commit(1, "Initial commit\n", ops)
    weights, styles = zip(*STYLES)
    kind_weights, kinds = zip(*KINDS)
    pr = 10
    for mark in range(2, n_commits + 1):
        pr += rng.randint(1, 3)
        if rng.random() < SINGLE_FILE_SHARE:
            touched = [rng.choice(by_ext[rng.choices(kinds, kind_weights)[0]])]
        else:  # a PR touching code, its tests and docs
            touched = rng.sample(list(files), rng.randint(2, 6))
        style = rng.choices(styles, weights)[0]
        message = subject_for(style, rng, pr, Path(touched[0]).stem)
        if rng.random() < 0.4:  # squash merges carry the PR's commit list as the body
            message += "\n\n" + "\n".join(f"* {rng.choice(VERBS).lower()} {rng.choice(OBJECTS)}"
                                          for _ in range(rng.randint(1, 4)))
        commit(mark, message + "\n", [edit(name, mark) for name in touched])
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    subprocess.run(["git", "-C", str(path), "fast-import", "--quiet"], input=b"".join(stream), check=True)
    subprocess.run(["git", "-C", str(path), "reset", "-q", "--hard", "main"], check=True)
    return path


def octoray(*args: str) -> None:
    """Run ``octoray ARGS`` as a user would (a subprocess of this interpreter)."""
    print("$ octoray " + " ".join(args), file=sys.stderr)
    subprocess.run([sys.executable, "-m", "octoray.cli", *args], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, help="mine this repository instead of a generated one")
    parser.add_argument("--commits", type=int, default=4000, help="commits of the generated history")
    parser.add_argument("--work", type=Path, help="directory for the repository and outputs (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="squash-history-"))
    repo = args.repo or build_repo(work / "repo", args.commits)
    shared = Path(os.environ.get("OCTORAY_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    decontam = ([f"humanevalpack_dir={shared / 'humanevalpack'}"] if (shared / "humanevalpack").is_dir()
                else ["decontam=false"])
    octoray("mine", str(repo), "--out", str(work / "commits"), "progress=false")
    runs = {"keep": work / "sft_paper", "strip": work / "sft_strip"}
    for mode, out in runs.items():
        octoray("filter", str(work / "commits"), "--out", str(out), f"pr_suffix={mode}", f"emoji_prefix={mode}",
                "tokenizer_rule=false", "progress=false", *decontam)
    mined = json.loads((work / "commits" / "stats.json").read_text())
    stats = {mode: json.loads((out / "stats.json").read_text()) for mode, out in runs.items()}
    n = int(subprocess.run(["git", "-C", str(repo), "rev-list", "--count", "HEAD"], capture_output=True, text=True,
                           check=True).stdout)
    print(f"\nrepository: {args.repo or f'generated squash-merge history, {args.commits} commits'} ({n} commits, "
          f"{mined['kept']:,} CommitPack rows mined)\n")
    print("| rule | paper rules (`pr_suffix=keep emoji_prefix=keep`) | octoray default (`strip`) |")
    print("|---|---:|---:|")
    for key, left in stats["keep"]["funnel"].items():
        if key == "token_length":
            continue  # off here (no tokenizer offline): the same number as the rule before
        print(f"| `{key}` | {left:,} | {stats['strip']['funnel'][key]:,} |")
    rescued = stats["strip"]["subject_normalisation"]["rescued"]
    kept = {mode: s["commitpackft_rows"] for mode, s in stats.items()}
    print(f"| rescued by the normalisation | - | {rescued:,} |")
    print(f"\nkept: {kept['keep']:,} -> {kept['strip']:,} ({kept['strip'] / max(kept['keep'], 1):.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
