"""``octoray submit / status / logs / stop``: run octoray on a Ray cluster as a Ray Job.

    octoray submit jobs/octocoder.yaml --address http://HEAD:8265            # the whole pipeline
    octoray submit jobs/demo.yaml --stage "train --data /nfs/sft --out /nfs/runs/t" lr=1e-3   # train -c jobs/demo.yaml ...
    octoray submit --entrypoint "python -m octoray.cli --version"             # any command
    octoray status [JOB_ID]     octoray logs JOB_ID [--follow]     octoray stop JOB_ID

``submit`` packs the project checkout as the job's ``working_dir`` (outputs, virtualenvs and git
metadata left out), adds the project's runtime dependencies as the job's ``pip`` environment
(``pip=none`` when the cluster image already has octoray), submits ``python -m octoray.cli
pipeline CONFIG ...`` through :class:`ray.job_submission.JobSubmissionClient`, streams the job's
logs and exits with the job's outcome: 0 succeeded, 1 failed, 130 stopped. ``--no-wait`` prints
the job id and returns at once.

Token auth: clusters started with ``RAY_AUTH_MODE=token`` reject requests without the token.
The token comes from ``--token``, else ``RAY_AUTH_TOKEN``, else the file named by
``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token`` (what ``ray get-auth-token --generate``
writes), and is sent as ``Authorization: Bearer ...`` -- the header Ray's dashboard checks.
We pass it ourselves because Ray's client only adds it when ``RAY_AUTH_MODE=token`` is set on
the *submitting* machine too, which users rarely do.

Submit settings can also live in the config file's ``submit:`` section (see :class:`SubmitConfig`);
command-line flags win over it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (a dependency there)
    import tomli as tomllib

from octoray import __version__
from octoray.config import STAGE_SECTIONS, from_mapping, option, parse_overrides, read_yaml, split_overrides
from octoray.errors import UserError

#: Default dashboard (Jobs API) address when neither --address nor the environment names one.
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
#: How the job runs octoray: the module form works both from the uploaded working_dir and from
#: an image with octoray installed, without relying on a console script being on PATH.
LAUNCHER = ("python", "-m", "octoray.cli")
#: Verbs that talk to a cluster from outside and make no sense as a job.
CLIENT_VERBS = ("submit", "status", "logs", "stop")
#: Exit status of submit / logs --follow per terminal job status (130 = like Ctrl-C).
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 130}
TERMINAL = frozenset(EXIT_CODES)
#: A freshly started head answers HTTP before its dashboard agent is registered and refuses
#: submissions meanwhile ("No available agent"); keep retrying this long.
AGENT_WAIT_S = 180.0
#: ``working_dir`` value that uploads nothing: the job runs the octoray installed on the cluster
#: (an image built from cluster/Dockerfile), and paths are the cluster's.
NO_UPLOAD = "none"
#: Paths never worth uploading (gitignore syntax): environments, caches, git metadata anywhere,
#: and stage outputs of local runs at the top of the checkout (anchored, so a package directory
#: that happens to be called ``eval`` deeper down still travels).
DEFAULT_EXCLUDES = (".venv/", "venv/", ".git/", "__pycache__/", "*.pyc", "*.egg-info/", ".pytest_cache/",
                    ".toolchains/", "/.whl/", "/.gl/", "/runs/", "/commits/", "/sft/", "/eval/", "/outputs/")


@dataclass(frozen=True)
class SubmitConfig:
    """Options of ``octoray submit`` (flags, or the ``submit:`` section of the config file)."""

    address: str = option("", "Ray dashboard address, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, "
                              f"$RAY_ADDRESS, else {DEFAULT_ADDRESS})")
    working_dir: str = option("", "directory uploaded as the job's working_dir (default: the checkout "
                                  "octoray is installed from, which submit prints); 'none' uploads nothing "
                                  "and runs the octoray installed on the cluster")
    excludes: tuple[str, ...] = option(DEFAULT_EXCLUDES, "gitignore-style patterns left out of the upload "
                                                         "(.gitignore files are honoured too)")
    pip: tuple[str, ...] = option(("auto",), "pip packages for the job: 'auto' = the runtime dependencies in "
                                             "pyproject.toml (ray itself excluded), 'none' = use the cluster's "
                                             "Python as is, or a list of requirements")
    env_vars: tuple[str, ...] = option((), "environment variables for the job: KEY=VALUE items "
                                           "(a KEY: value mapping in YAML)")
    entrypoint_num_cpus: float = option(0.0, "CPUs reserved for the job's driver process")
    entrypoint_num_gpus: float = option(0.0, "GPUs reserved for the job's driver process")
    job_id: str = option("", "submission id to use (default: generated by Ray); must be unique on the cluster")
    wait: bool = option(True, "stream the logs and wait for the job to finish (false: print the id and return)")

    def problems(self) -> list[str]:
        """Every invalid value, as messages."""
        found = []
        if self.entrypoint_num_cpus < 0 or self.entrypoint_num_gpus < 0:
            found.append("entrypoint_num_cpus/entrypoint_num_gpus must be >= 0")
        if len(self.pip) > 1 and ({"auto", "none"} & set(self.pip)):
            found.append("pip: 'auto' and 'none' stand alone, not inside a list of packages")
        bad = [item for item in self.env_vars if "=" not in item or item.startswith("=")]
        if bad:
            found.append(f"env_vars: expected KEY=VALUE, got {', '.join(map(repr, bad))}")
        if self.address and self.address.startswith("ray://"):
            found.append("address: Ray Jobs use the dashboard address http://HEAD:8265, not a ray:// client address")
        return found


# --- building the job ------------------------------------------------------------------------

def project_root() -> Path:
    """The octoray checkout this module was loaded from (where pyproject.toml lives)."""
    root = Path(__file__).resolve().parents[2]  # octoray/cluster/jobs_client.py -> the checkout
    if not (root / "pyproject.toml").is_file():
        raise UserError("octoray is installed, not checked out: pass --working-dir with the project checkout")
    return root


def runtime_deps(pyproject: Path) -> list[str]:
    """``[project].dependencies`` of ``pyproject``, without Ray (the cluster's Ray must not change)."""
    if not pyproject.is_file():
        raise UserError(f"pip=auto reads {pyproject}, which does not exist: give pip=none or a package list")
    try:
        deps = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    except (tomllib.TOMLDecodeError, KeyError) as exc:
        raise UserError(f"cannot read [project].dependencies from {pyproject}: {exc}") from None
    return [dep for dep in deps if _requirement_name(dep) != "ray"]


def runtime_env(cfg: SubmitConfig, working_dir: Path | None) -> dict[str, Any]:
    """The job's runtime_env: the uploaded checkout (none when ``working_dir`` is None), its pip
    packages and environment variables."""
    env: dict[str, Any] = {} if working_dir is None else {"working_dir": str(working_dir),
                                                          "excludes": list(cfg.excludes)}
    if cfg.pip == ("auto",):
        packages = runtime_deps((working_dir or project_root()) / "pyproject.toml")
    elif cfg.pip in ((), ("none",)):
        packages = []
    else:
        packages = list(cfg.pip)
    if packages:
        # pip_check off: the cluster's preinstalled packages (Ray's own pins) need not agree with
        # every transitive pin of ours for the job to run.
        env["pip"] = {"packages": packages, "pip_check": False}
    # Unbuffered: the log stream shows progress as it happens, not when a buffer fills.
    env["env_vars"] = {"PYTHONUNBUFFERED": "1", **dict(item.split("=", 1) for item in cfg.env_vars)}
    return env


def entrypoint(args: list[str], stage: str | None, command: str | None, working_dir: Path | None) -> str:
    """The shell command the job runs.

    ``args`` are the positional CONFIG / ``key=value`` arguments; ``stage`` a whole octoray
    command line (``"train --data D --out O"``); ``command`` a raw shell command. Local paths
    inside ``working_dir`` become relative to it, since the job runs inside its uploaded copy.
    """
    if command is not None:
        if stage is not None or args:
            raise UserError("--entrypoint is a whole command: give no CONFIG, key=value or --stage with it")
        if not command.strip():
            raise UserError("--entrypoint is empty")
        return command
    if stage is not None:
        words = shlex.split(stage)
        if not words:
            raise UserError("--stage is empty: give an octoray command, e.g. --stage \"train --data D --out O\"")
        _check_verb(words[0])
        # Every stage verb takes its config as -c FILE (octoray.stage_cli); key=value words follow.
        positional, overrides = split_overrides(args)
        if len(positional) > 1:
            raise UserError(f"give at most one CONFIG file with --stage, got {len(positional)}: {' '.join(positional)}")
        words += [*(["-c", positional[0]] if positional else []), *overrides]
    else:
        positional, overrides = split_overrides(args)
        if len(positional) != 1:
            raise UserError("give one CONFIG file for the pipeline (or --stage / --entrypoint), "
                            f"got {len(positional)}: {' '.join(positional) or 'none'}")
        if not Path(positional[0]).is_file():
            raise UserError(f"config file not found: {positional[0]}")
        # -c, not a positional word: a config without the .yaml suffix is still a config.
        words = ["pipeline", "-c", positional[0], *overrides]
    return shlex.join([*LAUNCHER, words[0], *(_remote_path(w, working_dir) for w in words[1:])])


def _check_verb(verb: str) -> None:
    from octoray.stage_cli import VERBS  # the verb table only; no stage module is imported

    if verb not in VERBS or verb in CLIENT_VERBS:
        choices = ", ".join(v for v in VERBS if v not in CLIENT_VERBS)
        raise UserError(f"--stage must start with an octoray command ({choices}), got '{verb}'")


def _remote_path(word: str, working_dir: Path | None) -> str:
    """An existing local path as the job will see it; anything else unchanged."""
    if word.startswith("-") or "=" in word or not os.path.exists(word):
        return word
    path = Path(word).resolve()
    if working_dir is None:  # nothing uploaded: the job reads this machine's paths, if it can
        return str(path)
    if path == working_dir or working_dir in path.parents:
        return path.relative_to(working_dir).as_posix() or "."
    # Outside the upload: only a cluster that shares this file system (NFS, a local cluster) has it.
    print(f"octoray submit: note: {word} is not inside {working_dir}; the job reads {path} on the cluster",
          file=sys.stderr)
    return str(path)


def _requirement_name(requirement: str) -> str:
    name = requirement.strip()
    for stop in "[<>=!~; @":
        name = name.split(stop, 1)[0]
    return name.strip().lower().replace("_", "-")


# --- talking to the cluster --------------------------------------------------------------------

def resolve_address(address: str | None) -> str:
    """``--address``, else ``$RAY_API_SERVER_ADDRESS``, else ``$RAY_ADDRESS``, else the local default."""
    address = (address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
               or DEFAULT_ADDRESS).strip().rstrip("/")
    if address.startswith("ray://"):
        raise UserError(f"{address} is a Ray Client address; Ray Jobs use the dashboard, http://HEAD:8265")
    if "://" not in address:
        address = f"http://{address}"
    return address


def address_origin(address: str | None) -> str:
    """How :func:`resolve_address` chose its answer, for the first line a command prints."""
    if address:
        return "--address"
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        if os.environ.get(name):
            return f"${name}"
    return "the default: no --address, $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS"


def announce_address(verb: str, address: str | None) -> None:
    """Without ``--address``, say on stderr which dashboard the command talks to and why, first:
    the local default reaches whatever Ray listens on 127.0.0.1:8265."""
    if not address:
        print(f"octoray {verb}: Ray dashboard {resolve_address(address)} ({address_origin(address)})",
              file=sys.stderr, flush=True)


def resolve_token(token: str | None) -> str | None:
    """The cluster token: ``--token``, ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``."""
    if token:
        return token.strip()
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            return Path(path).expanduser().read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read: {exc.strerror}") from None
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file():
        return default.read_text(encoding="utf-8").strip() or None
    return None


def connect(address: str | None, token: str | None) -> Any:
    """A JobSubmissionClient for the cluster, or a one-line UserError saying why there is none."""
    from ray.job_submission import JobSubmissionClient

    _quiet_ray_client()
    url = resolve_address(address)
    secret = resolve_token(token)
    headers = {"Authorization": f"Bearer {secret}"} if secret else None
    # Ray's client lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address it is given;
    # here --address must win, so hide those while it resolves.
    with _without_env("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"), _translate_errors(url):
        return JobSubmissionClient(url, headers=headers)


def _quiet_ray_client() -> None:
    """Keep the client's per-file packaging notes off the terminal; warnings and errors still show."""
    import logging

    for name, level in (("ray.dashboard.modules.dashboard_sdk", logging.WARNING),
                        ("ray.dashboard.modules.job.sdk", logging.WARNING),
                        ("ray._private.runtime_env.packaging", logging.WARNING),
                        # it warns that .git/.venv are skipped by default: we exclude them anyway
                        ("ray._private.runtime_env.working_dir", logging.ERROR)):
        logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _without_env(*names: str) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def _translate_errors(url: str, job_id: str | None = None) -> Iterator[None]:
    """Turn the client's connection, auth and 404 failures into one-line UserErrors."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "authentication failed"
        hint = ("set RAY_AUTH_TOKEN or pass --token" if "Authentication required" in first
                else "check RAY_AUTH_TOKEN / --token")
        raise UserError(f"the Ray cluster at {url} refused the request ({first.rstrip('.:')}): {hint}") from None
    except (ConnectionError, requests.exceptions.ConnectionError, requests.exceptions.Timeout):
        raise UserError(f"cannot reach the Ray dashboard at {url}: is the cluster up? "
                        "(set --address or RAY_ADDRESS to http://HEAD:8265)") from None
    except RuntimeError as exc:
        text = str(exc)
        if job_id is not None and ("404" in text or "does not exist" in text):
            raise UserError(f"no job '{job_id}' on the Ray cluster at {url}") from None
        if "already exists" in text:
            raise UserError(f"a job with this id already exists on {url}: choose another job_id") from None
        if "status code" in text:  # an HTTP error from the Jobs API: its body is the useful part
            body = text.split(": ", 1)[-1].strip().splitlines()[0] if ": " in text else text
            raise UserError(f"the Ray cluster at {url} rejected the request: {body}") from None
        raise


def submit(cfg: SubmitConfig, command: str, token: str | None = None) -> str:
    """Submit ``command`` as a Ray Job with the runtime env of ``cfg``; returns the job id."""
    working_dir = _working_dir(cfg)
    if working_dir is not None and not working_dir.is_dir():
        raise UserError(f"working_dir {working_dir} is not a directory")
    client = connect(cfg.address, token)
    kwargs: dict[str, Any] = {
        "entrypoint": command,
        "runtime_env": runtime_env(cfg, working_dir),
        "metadata": {"octoray_version": __version__, "submitted_from": str(working_dir or "installed octoray")},
        "submission_id": cfg.job_id or None,
        "entrypoint_num_cpus": cfg.entrypoint_num_cpus or None,
        "entrypoint_num_gpus": cfg.entrypoint_num_gpus or None,
    }
    deadline = time.monotonic() + AGENT_WAIT_S
    what = (f"uploading {working_dir} (the checkout octoray runs from; --working-dir to change)" if working_dir
            else "running the octoray installed on")
    print(f"octoray submit: {what} to {client._address} ({address_origin(cfg.address)})",  # noqa: SLF001
          file=sys.stderr, flush=True)
    with _translate_errors(client._address):  # noqa: SLF001 - the resolved URL, for messages
        while True:
            try:
                return client.submit_job(**kwargs)
            except RuntimeError as exc:
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(2.0)  # the head is still starting (see AGENT_WAIT_S); the upload is not repeated


def _working_dir(cfg: SubmitConfig) -> Path | None:
    """The directory to upload, or None for 'none' (the cluster's installed octoray runs)."""
    if cfg.working_dir == NO_UPLOAD:
        return None
    return Path(cfg.working_dir).resolve() if cfg.working_dir else project_root()


def follow(client: Any, job_id: str, out: Any = None) -> str:
    """Stream the job's logs to ``out`` until it ends; returns its terminal status name."""
    out = out or sys.stdout

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    url = client._address  # noqa: SLF001
    with _translate_errors(url, job_id):
        try:
            asyncio.run(_tail())
        except RuntimeError as exc:
            # The websocket can drop (a proxy, a restarted dashboard); the status still tells the outcome.
            if "WebSocket" not in str(exc):
                raise
            print(f"octoray: log stream interrupted ({exc}); waiting for the job to finish", file=sys.stderr)
        return wait_for_end(client, job_id)


def wait_for_end(client: Any, job_id: str, timeout_s: float | None = None) -> str:
    """Poll until the job reaches a terminal status (the log stream can close slightly earlier)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with _translate_errors(client._address, job_id):  # noqa: SLF001
        while True:
            status = str(client.get_job_status(job_id).value)
            if status in TERMINAL or (deadline is not None and time.monotonic() > deadline):
                return status
            time.sleep(0.5)


# --- command line ------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``octoray submit|status|logs|stop``; the verb is the last word of ``parser.prog``.

    submit's options are generated from :class:`SubmitConfig` (:mod:`octoray.stage_cli`), as every
    stage verb's are from its config; its ``key=value`` words belong to the job's command.
    """
    verb = parser.prog.split()[-1]
    parser.add_argument("--token", help="cluster auth token (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, "
                                        "~/.ray/auth_token)")
    if verb == "submit":
        from octoray.stage_cli import FlagAlias, add_config_flags

        parser.add_argument("args", nargs="*", metavar="CONFIG [key=value ...]",
                            help="the pipeline config (a path inside the checkout) and overrides passed on")
        parser.add_argument("--stage", metavar="COMMAND",
                            help='run one octoray command instead of the pipeline, e.g. "train --data D --out O"'
                                 " (CONFIG is passed as -c CONFIG, then the key=value words)")
        parser.add_argument("--entrypoint", metavar="SHELL_COMMAND",
                            help="run this shell command instead (inside the uploaded checkout)")
        parser.add_argument("--env", action="append", metavar="KEY=VALUE",
                            help="job environment variable (repeatable; replaces env_vars)")
        add_config_flags(parser, SubmitConfig, "submit options (flags, or the config file's submit: section; "
                                               "key=value words are passed on to the job's command)",
                         (FlagAlias("--num-cpus", "entrypoint_num_cpus"), FlagAlias("--num-gpus", "entrypoint_num_gpus")))
        parser.epilog = "exit status: 0 job succeeded, 1 job failed, 130 job stopped, 2 usage error"
        return
    parser.add_argument("--address", help="Ray dashboard URL (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, "
                                          f"else {DEFAULT_ADDRESS})")
    if verb == "status":
        parser.add_argument("job_id", nargs="?", help="the job (default: list every job on the cluster)")
    else:
        parser.add_argument("job_id", help="the job id printed by 'octoray submit'")
    if verb == "logs":
        parser.add_argument("--follow", "-f", action="store_true",
                            help="stream until the job ends; exit 0 succeeded, 1 failed, 130 stopped")
    if verb == "stop":
        parser.add_argument("--no-wait", dest="wait", action="store_false", help="do not wait until it has stopped")


def main(args: argparse.Namespace) -> int:
    """Run the verb in ``args.command``."""
    return {"submit": _main_submit, "status": _main_status, "logs": _main_logs, "stop": _main_stop}[args.command](args)


def _main_submit(args: argparse.Namespace) -> int:
    cfg = _submit_config(args)
    working_dir = _working_dir(cfg)
    command = entrypoint(list(args.args), args.stage, args.entrypoint, working_dir)
    job_id = submit(replace(cfg, working_dir=str(working_dir or NO_UPLOAD)), command, args.token)
    if not cfg.wait:
        print(job_id)
        return 0
    print(f"octoray submit: job {job_id}: {command}", file=sys.stderr, flush=True)
    client = connect(cfg.address, args.token)
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\noctoray submit: detached; job {job_id} keeps running "
              f"(octoray logs {job_id} --follow, octoray stop {job_id})", file=sys.stderr)
        return 130
    print(f"octoray submit: job {job_id} {status}", file=sys.stderr)
    return EXIT_CODES[status]


def _submit_config(args: argparse.Namespace) -> SubmitConfig:
    """Defaults < the config file's ``submit:`` section < flags."""
    raw: dict[str, Any] = {}
    positional, _ = split_overrides(args.args)
    if positional and args.entrypoint is None and Path(positional[0]).suffix in (".yaml", ".yml") \
            and Path(positional[0]).is_file():
        data = read_yaml(positional[0])
        if any(key in STAGE_SECTIONS for key in data):  # a flat file holds one stage's keys, not ours
            section = data.get("submit") or {}
            if not isinstance(section, dict):
                raise UserError(f"config section 'submit' in {positional[0]} must be a mapping")
            raw.update(section)
            if isinstance(raw.get("env_vars"), dict):
                raw["env_vars"] = [f"{key}={value}" for key, value in raw["env_vars"].items()]
    raw.update(parse_overrides(args.settings or []))  # the flags, in command-line order (last wins)
    if args.env:
        raw["env_vars"] = args.env
    return from_mapping(SubmitConfig, raw, source="submit options")


def _main_status(args: argparse.Namespace) -> int:
    announce_address("status", args.address)
    client = connect(args.address, args.token)
    with _translate_errors(client._address, args.job_id):  # noqa: SLF001
        if args.job_id is None:
            jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
            for job in jobs:
                print(f"{job.submission_id or job.job_id}\t{job.status.value}\t{job.entrypoint}")
            return 0
        info = client.get_job_info(args.job_id)
    print(f"job:        {args.job_id}\nstatus:     {info.status.value}\nentrypoint: {info.entrypoint}")
    if info.message:
        print(f"message:    {info.message}")
    if info.start_time:
        end = info.end_time or time.time() * 1000
        print(f"duration:   {(end - info.start_time) / 1000:.1f} s")
    return 0


def _main_logs(args: argparse.Namespace) -> int:
    announce_address("logs", args.address)
    client = connect(args.address, args.token)
    if args.follow:
        status = follow(client, args.job_id)
        print(f"octoray logs: job {args.job_id} {status}", file=sys.stderr)
        return EXIT_CODES[status]
    with _translate_errors(client._address, args.job_id):  # noqa: SLF001
        sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def _main_stop(args: argparse.Namespace) -> int:
    announce_address("stop", args.address)
    client = connect(args.address, args.token)
    with _translate_errors(client._address, args.job_id):  # noqa: SLF001
        requested = client.stop_job(args.job_id)
    if not requested:
        status = wait_for_end(client, args.job_id, timeout_s=0)
        print(f"job {args.job_id} was not running ({status})")
        return 0
    status = wait_for_end(client, args.job_id, timeout_s=60) if args.wait else "stopping"
    print(f"job {args.job_id} {status}")
    return 0
