"""The one command line of every stage verb (octoray/stage_cli.py), and every documented command.

Everything here parses (argparse + load_config) and does no work: no Ray, no model.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from octoray import stage_cli
from octoray.cli import STAGE_VERBS, VERBS, main
from octoray.cluster import jobs_client as jobs
from tests.helpers import REPO_ROOT

HEAVY = ("torch", "transformers", "deepspeed", "ray")

#: Per verb: words that make an otherwise-default config valid, and two int keys to play with.
BASE = {
    "mine": (["repo", "--out", "commits"], "chunk_commits", "max_file_bytes"),
    "filter": (["commits", "--out", "sft"], "seed", "decontam_ngram"),
    "train": (["--data", "sft", "--out", "run"], "seq_len", "max_steps"),
    "tune": (["--data", "sft", "--out", "tune"], "num_samples", "seed"),
    "serve": (["runs/demo/model"], "port", "default_max_tokens"),
    "eval": (["--generator", "oracle:canonical"], "n_samples", "max_new_tokens"),
    "pipeline": ([], "latency_requests", "latency_concurrency"),
}


def _module(verb: str):
    return importlib.import_module(VERBS[verb][0])


def _parse(verb: str, *words: str):
    return stage_cli.parse(verb, list(words), _module(verb), check_inputs=False).configs[0]


def test_every_stage_verb_is_covered() -> None:
    assert set(BASE) == set(STAGE_VERBS)


@pytest.mark.parametrize("verb", [*STAGE_VERBS, "submit"])
def test_help_lists_every_key_and_imports_nothing_heavy(verb: str) -> None:
    code = ("import sys\nfrom octoray.cli import main\ntry:\n    main([sys.argv[1], '--help'])\n"
            "except SystemExit:\n    pass\n"
            f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code, verb], capture_output=True, text=True, check=True,
                            cwd=REPO_ROOT, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert result.stdout.strip().splitlines()[-1] == "HEAVY []"
    cls = jobs.SubmitConfig if verb == "submit" else _module(verb).CONFIG
    for field in dataclasses.fields(cls):
        flag = f"--{field.name.replace('_', '-')}"
        assert re.search(rf"{flag}\b", result.stdout), f"{flag} missing from octoray {verb} --help"
        assert "(default: " in result.stdout
    if verb != "submit":
        assert "-c CONFIG.yaml, --config CONFIG.yaml" in result.stdout


@pytest.mark.parametrize("verb", STAGE_VERBS)
def test_unknown_key_and_bad_value_are_one_line_exit_2(verb: str, capsys) -> None:
    base, number, _ = BASE[verb]
    config = ["jobs/demo.yaml"] if verb == "pipeline" else []
    for words, fragment in (([*config, *base, "no_such_key=1"], "unknown key 'no_such_key'"),
                            ([*config, *base, f"--{number.replace('_', '-')}", "many"],
                             f"{number}: expected an integer, got 'many'"),
                            ([*config, *base, "--no-such-flag"], "unrecognized arguments: --no-such-flag")):
        capsys.readouterr()
        assert main([verb, *words]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"octoray {verb}: error: ") and fragment in err, err


def test_submit_unknown_flag_and_bad_value_are_one_line_exit_2(capsys) -> None:
    for words, fragment in ((["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
                            (["--entrypoint-num-cpus", "many"], "entrypoint_num_cpus: expected a number")):
        capsys.readouterr()
        assert main(["submit", "--entrypoint", "true", *words]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("octoray submit: error: ") and fragment in err, err


def test_submit_flags_and_old_aliases(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("submit: {entrypoint_num_cpus: 1, pip: [a]}\ntrain: {}\n")

    def submit_config(*words: str) -> jobs.SubmitConfig:
        parser = argparse.ArgumentParser(prog="octoray submit")
        jobs.add_arguments(parser)
        return jobs._submit_config(parser.parse_intermixed_args([str(config), *words]))  # noqa: SLF001

    assert submit_config().entrypoint_num_cpus == 1 and submit_config().pip == ("a",)
    assert submit_config("--num-cpus", "2").entrypoint_num_cpus == 2
    assert submit_config("--num-cpus", "2", "--entrypoint-num-cpus", "3").entrypoint_num_cpus == 3
    assert submit_config("--env", "A=1", "--env", "B=2").env_vars == ("A=1", "B=2")
    assert submit_config("--env-vars", "A=1,B=2").env_vars == ("A=1", "B=2")
    assert submit_config("--no-wait").wait is False
    assert submit_config("--pip", "none", "max_steps=3").pip == ("none",)  # key=value words go to the job


@pytest.mark.parametrize("verb", STAGE_VERBS)
def test_config_file_flags_and_keys_combine_last_one_wins(verb: str, tmp_path: Path) -> None:
    base, first, second = BASE[verb]
    section = "pipeline" if verb == "pipeline" else verb
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({section: {first: 11, second: 12}}))
    flag = f"--{first.replace('_', '-')}"
    underscore = f"--{first}"
    default = getattr(_module(verb).CONFIG(), second)
    cases = [
        (["-c", str(cfg_file)], 11),
        ([str(cfg_file)], 11),                                  # a positional CONFIG.yaml
        (["--config", str(cfg_file), flag, "13"], 13),           # flags beat the file
        ([str(cfg_file), f"{first}=14"], 14),                   # so do keys
        (["-c", str(cfg_file), flag, "13", f"{first}=14"], 14),  # the last one wins
        (["-c", str(cfg_file), f"{first}=14", underscore, "13"], 13),
        ([f"{first}=14", str(cfg_file), f"{flag}=15"], 15),
    ]
    for words, expected in cases:
        cfg = _parse(verb, *base, *words)
        assert getattr(cfg, first) == expected, words
        assert getattr(cfg, second) == 12  # from the file, untouched by the command line
    if verb != "pipeline":  # the pipeline needs its config file
        assert getattr(_parse(verb, *base), second) == default


def test_bool_switches_and_inputs() -> None:
    cfg = _parse("filter", "commits/", "--out", "sft/", "--no-decontam", "--tokenizer-rule")
    assert cfg.commits == "commits/" and not cfg.decontam and cfg.tokenizer_rule
    assert _parse("mine", "a", "b", "--out", "o").sources == ("a", "b")
    assert _parse("eval", "--generator", "oracle:canonical", "--allow-code-execution").allow_code_execution
    with pytest.raises(Exception, match="expected one COMMITS"):
        _parse("filter", "a", "b", "--out", "o")
    with pytest.raises(Exception, match="unexpected argument"):
        _parse("train", "stray", "--data", "d", "--out", "o")
    with pytest.raises(Exception, match="give one config file"):
        _parse("train", "a.yaml", "-c", "b.yaml")


def test_humanevalpack_dir_is_one_name_with_old_names_kept(tmp_path: Path) -> None:
    for words in (["--humanevalpack-dir", "H"], ["--data-dir", "H"], ["data_dir=H"], ["humanevalpack_dir=H"]):
        assert _parse("eval", "--generator", "oracle:canonical", *words).humanevalpack_dir == "H"
    old = tmp_path / "old.yaml"
    old.write_text("eval:\n  data_dir: H\n")
    assert _parse("eval", "--generator", "oracle:canonical", str(old)).humanevalpack_dir == "H"
    assert _parse("eval", "--generator", "oracle:canonical", str(old), "--humanevalpack-dir", "N").humanevalpack_dir == "N"
    assert _parse("pipeline", "jobs/demo.yaml", "--data-dir", "H").humanevalpack_dir == "H"
    same = {next((f.default, f.metadata["help"]) for f in dataclasses.fields(_module(verb).CONFIG)
                 if f.name == "humanevalpack_dir") for verb in ("filter", "eval", "pipeline")}
    assert len(same) == 1
    with pytest.raises(Exception, match="deprecated name of 'humanevalpack_dir'"):
        _parse("eval", "--generator", "oracle:canonical", "data_dir=a", "humanevalpack_dir=b")


def test_ray_address_is_one_field_everywhere() -> None:
    fields = [next(f for f in dataclasses.fields(_module(verb).CONFIG) if f.name == "ray_address")
              for verb in ("serve", "eval")]
    hints = {typing.get_type_hints(_module(verb).CONFIG)["ray_address"] for verb in ("serve", "eval")}
    assert len({(f.default, f.metadata["help"]) for f in fields}) == 1 and fields[0].default is None
    assert hints == {typing.Optional[str]}


def test_train_and_tune_report_missing_inputs_with_the_other_problems(tmp_path: Path) -> None:
    from octoray.training import driver as training
    from octoray.training import tuning
    with pytest.raises(Exception) as caught:
        stage_cli.parse("train", ["--data", str(tmp_path / "nope"), "--hparams", str(tmp_path / "nt"), "lr=0"],
                        training)
    text = str(caught.value)
    for fragment in ("SFT data directory not found", "out: required", "tune directory not found", "lr must be > 0"):
        assert fragment in text, text
    with pytest.raises(Exception, match="num_samples must be >= 1.*SFT data directory not found"):
        stage_cli.parse("tune", ["--data", str(tmp_path / "nope"), "--out", "t", "num_samples=0"], tuning)
    # URIs are taken as given: no network at parse time
    cfg = stage_cli.parse("train", ["--data", "s3://bucket/sft", "--out", "s3://bucket/run"], training).configs[0]
    assert cfg.data == "s3://bucket/sft"


# --- the submitted stage gets its config the same way -----------------------------------------------


@pytest.mark.parametrize("verb", STAGE_VERBS)
def test_submit_stage_passes_the_config_to_every_verb(verb: str, tmp_path: Path, monkeypatch) -> None:
    base, first, second = BASE[verb]
    monkeypatch.chdir(tmp_path)
    Path("c.yaml").write_text(yaml.safe_dump({verb: {first: 11, second: 12}}))
    command = jobs.entrypoint(["c.yaml", f"{second}=13"], shlex.join([verb, *base]), None, tmp_path)
    words = shlex.split(command)
    assert words[:4] == [*jobs.LAUNCHER, verb]
    cfg = _parse(verb, *words[4:])
    assert (getattr(cfg, first), getattr(cfg, second)) == (11, 13)


# --- every documented command line parses -------------------------------------------------------------

#: Synopsis lines (placeholders, [optional] parts) and the concrete line each stands for.
SYNOPSES = {
    "octoray VERB [INPUT...] [CONFIG.yaml] [-c CONFIG.yaml] [--key value ...] [key=value ...]":
        "octoray mine REPO --out commits/ -c jobs/demo.yaml --chunk-commits 500 workers=1",
    "octoray eval --generator G --tasks fix,explain,synthesize --languages python,js,java,go,cpp,rust "
    "--humanevalpack-dir DIR --allow-code-execution --out OUT [--limit N] [CONFIG.yaml] [key=value ...]":
        "octoray eval --generator oracle:canonical --tasks fix,explain,synthesize --languages python,js,java,go,cpp,rust "
        "--humanevalpack-dir DIR --allow-code-execution --out OUT --limit 3 jobs/demo.yaml n_samples=2",
    "octoray mine REPO_OR_URL... [CONFIG.yaml] --out commits/ [--languages-file FILE] [key=value ...]":
        "octoray mine REPO_OR_URL --out commits/ -c jobs/demo.yaml --languages-file FILE chunk_commits=5",
    "octoray train CONFIG.yaml --data SFT_DIR --out RUN_DIR [--hparams TUNE_DIR] [key=value ...]":
        "octoray train jobs/demo.yaml --data SFT_DIR --out RUN_DIR --hparams TUNE_DIR max_steps=3",
    "octoray tune CONFIG.yaml --data SFT_DIR --out DIR [key=value | train.key=value ...]":
        "octoray tune jobs/demo.yaml --data SFT_DIR --out DIR num_samples=2 train.max_steps=4",
    "octoray logs raysubmit_XXXX [-f]": "octoray logs raysubmit_XXXX -f",
}
#: Lines in code blocks that start with "octoray" and are not commands: what octoray prints.
OUTPUT = re.compile(r"^octoray [\w-]+:")


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every ``octoray`` command line in a fenced block of README.md and docs/*.md
    and in the header comments of jobs/*.yaml; continuation lines joined, ``;`` split."""
    found: list[tuple[str, str]] = []
    for path in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        fenced = False
        pending = ""
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip().startswith("```"):
                fenced = not fenced
                continue
            if not fenced:
                continue
            text = re.sub(r"^#\s*=?\s*", "", line.strip())  # commands quoted in a comment block
            if not pending and not text.startswith("octoray "):
                continue
            pending = f"{pending} {text}".strip()
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            found += [(f"{path.name}:{number}", part.strip()) for part in re.split(r"; (?=octoray )", pending)]
            pending = ""
    for path in sorted((REPO_ROOT / "jobs").glob("*.yaml")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.startswith("#"):
                break
            if line.startswith("#   octoray "):  # the commands of the header, indented
                found.append((f"{path.name}:{number}", line[1:].strip()))
    return found


def test_documented_commands_are_found() -> None:
    commands = [command for _, command in documented_commands()]
    assert not any(c.startswith("octoray demo") for c in commands)
    verbs = {shlex.split(c, comments=True)[1] for c in commands if not OUTPUT.match(c)}
    assert {*STAGE_VERBS, "submit", "status", "logs", "stop"} <= verbs
    assert set(SYNOPSES) <= {" ".join(w for w in shlex.split(c, comments=True) if w != "&") for c in commands}


@pytest.mark.parametrize("where,command", documented_commands())
def test_documented_command_parses(where: str, command: str, tmp_path: Path) -> None:
    if OUTPUT.match(command):
        return  # printed output quoted in the docs, not a command
    words = shlex.split(command, comments=True)
    words = [w for w in words if w != "&"]
    line = " ".join(words)
    if line in SYNOPSES:
        words = shlex.split(SYNOPSES[line])
    else:
        assert not re.search(r"(^|\s)\[", line), f"{where}: a synopsis line: give its concrete form in SYNOPSES"
    assert words[0] == "octoray", where
    _parse_command(words[1], words[2:], where)


def _parse_command(verb: str, argv: list[str], where: str) -> None:
    if verb in STAGE_VERBS:
        configs = stage_cli.parse(verb, argv, _module(verb), check_inputs=False).configs
        assert dataclasses.is_dataclass(configs[0]), where
        return
    parser = argparse.ArgumentParser(prog=f"octoray {verb}", exit_on_error=False)
    _module(verb).add_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    if verb != "submit":
        return
    jobs._submit_config(args)  # noqa: SLF001 - the submit: section and flags, checked
    command = jobs.entrypoint(list(args.args), args.stage, args.entrypoint, REPO_ROOT)
    remote = shlex.split(command)
    if remote[:3] == list(jobs.LAUNCHER) and remote[3] in STAGE_VERBS:
        _parse_command(remote[3], remote[4:], f"{where} (the job's command)")
