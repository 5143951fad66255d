"""Preemption notices on real ``ray start`` nodes (tests/helpers/raycluster.py: a head and a worker
node of one CPU each, so the two Ray Train workers sit on different nodes).

* SIGTERM to the training worker process on the worker node;
* AWS's ``spot/instance-action`` answered by a local HTTP server (IMDSv2 token included);
* ``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N`` for the
  worker node, the node killed at the deadline and a fresh one started (the autoscaler's part);
* a notice whose deadline is already shorter than the measured save: the fallback.

Each run finishes; the checkpoint it resumed from is the step at which the notice arrived (the
first step boundary after it, +-1), every step is in metrics.jsonl exactly once, and the tokens
count continues. Every run trains exactly as an unpreempted run of the same config and seed (one
reference run per length for the module): every step's loss equal to 1e-6, since a
resume restores the data position and each rank's RNG state and CPU fp32 math is deterministic.

Marked ``cluster``: several minutes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.helpers import OCTORAY, REPO_ROOT, raycluster
from tests.helpers.metadata import MetadataServer
from tests.helpers.sft import write_sft

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.cluster]

MAX_STEPS = 40
TRAIN = ["demo_embd=64", "demo_vocab=512", "seq_len=64", "batch_size=4", "micro_batch=1", "warmup_steps=1",
         "export=false", "preemption_poll_s=0.5", "max_failures=3", "keep_checkpoints=3"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not raycluster.can_unshare():
        pytest.skip("needs root (or CAP_SYS_ADMIN) for unshare --mount and a tmpfs mount")
    scratch = tmp_path_factory.mktemp("scratch")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    running = raycluster.start(scratch, env, workers=1)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def sft(tmp_path_factory) -> Path:
    return write_sft(tmp_path_factory.mktemp("data") / "sft", n=240)


@pytest.fixture(scope="module")
def reference_of(cluster, sft: Path, tmp_path_factory) -> Callable[[int], list[dict]]:
    """metrics.jsonl of an unpreempted run of the config with ``max_steps`` steps (what the
    preempted runs must equal; the schedule depends on max_steps), made once per length."""
    runs: dict[int, list[dict]] = {}

    def of(max_steps: int) -> list[dict]:
        if max_steps not in runs:
            cluster.ensure_workers(1)
            run = tmp_path_factory.mktemp("reference") / "run"
            args = [*OCTORAY, "train", str(REPO_ROOT / "jobs/demo.yaml"), "--data", str(sft), "--out", str(run),
                    *TRAIN, f"max_steps={max_steps}", "checkpoint_every=1000", "preemption_notice_url=null"]
            out = subprocess.run(args, cwd=REPO_ROOT, env=_env(cluster), capture_output=True, text=True, timeout=1200)
            assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
            rows = _rows(run)
            assert [r["step"] for r in rows] == list(range(1, max_steps + 1)) and {r["start_step"] for r in rows} == {0}
            runs[max_steps] = rows
        return runs[max_steps]
    return of


@pytest.fixture(scope="module")
def reference(reference_of) -> list[dict]:
    """The unpreempted MAX_STEPS run."""
    return reference_of(MAX_STEPS)


def _check_same_training(run: Path, reference: list[dict]) -> None:
    """The preempted run's per-step losses equal the unpreempted run's (the resume lost nothing:
    same data position, same RNG state, same optimizer state)."""
    rows = _rows(run)
    expected, got = [r["loss"] for r in reference], [r["loss"] for r in rows]
    assert got == pytest.approx(expected, abs=1e-6, rel=0), list(zip(expected, got))


def _env(cluster) -> dict[str, str]:
    return {**cluster.env, "RAY_ADDRESS": cluster.address, "OCTORAY_CACHE": str(Path(cluster.temp_dir) / "cache-driver")}


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _preemptions(run: Path) -> list[dict]:
    path = run / "preemptions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _wait_for(what: str, predicate: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"no {what} after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def _worker_logs(cluster) -> str:
    """What the Ray workers printed (this cluster runs no log monitor, so nothing reaches the driver)."""
    return "".join(path.read_text(errors="replace") for pattern in ("worker-*.out", "worker-*.err")
                   for path in Path(cluster.temp_dir).rglob(pattern))


def _train(cluster, sft: Path, run: Path, extra: list[str], act: Callable[[subprocess.Popen, Path], None],
           max_steps: int = MAX_STEPS) -> str:
    """``octoray train`` on the cluster; ``act(proc, log)`` once 3 steps are logged; the run's log
    and the workers' logs."""
    cluster.ensure_workers(1)
    log = run.parent / f"{run.name}.log"
    args = [*OCTORAY, "train", str(REPO_ROOT / "jobs/demo.yaml"), "--data", str(sft), "--out", str(run), *TRAIN,
            f"max_steps={max_steps}", *extra]
    with log.open("w") as handle:
        proc = subprocess.Popen(args, cwd=REPO_ROOT, env=_env(cluster), stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_for("3 logged steps", lambda: len(_rows(run)) >= 3, proc, log)
        assert len(_rows(run)) < max_steps - 10, "training was almost over before the notice"
        act(proc, log)
        proc.wait(timeout=1200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text + _worker_logs(cluster)


def _check_resumed_at_notice(run: Path, log: str, source: str, max_steps: int = MAX_STEPS) -> dict:
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, max_steps + 1))  # no step lost or counted twice
    per_step = 4 * 64
    assert all(r["tokens"] == r["step"] * per_step for r in rows)  # the token count continued
    records = _preemptions(run)
    assert len(records) == 1, records
    record = records[0]
    assert record["source"] == source and record["saved"] and record["resumes_from"] == record["step"]
    assert record["save_seconds"] > 0 and record["seconds_left_after_save"] > 0
    # The step saved is the first step boundary after the notice arrived (+1: the poll interval).
    arrived_at = next(r["step"] for r in rows if r["time"] >= record["received"])
    assert arrived_at <= record["step"] <= arrived_at + 1, (arrived_at, record)
    assert rows[record["step"] - 1]["preemption"]["source"] == source  # metrics.jsonl has it too
    restarts = {r["start_step"] for r in rows} - {0}
    assert restarts == {record["step"]}, restarts  # resumed from the notice's checkpoint
    assert f"preemption notice ({source}" in log and f"saved checkpoint_{record['step']:06d}" in log
    return record


def _train_worker_pid(node: raycluster.Node) -> int:
    """The newest RayTrainWorker process on ``node`` (an earlier run's may still be exiting)."""
    import psutil

    found = []
    for pid in node.processes():
        try:
            process = psutil.Process(pid)
            if "RayTrainWorker" in " ".join(process.cmdline()):
                found.append((process.create_time(), pid))
        except psutil.NoSuchProcess:
            continue
    if not found:
        raise AssertionError("no RayTrainWorker process on the worker node")
    return max(found)[1]


def test_sigterm_to_a_worker_checkpoints_at_the_next_step(cluster, sft: Path, reference, tmp_path: Path) -> None:
    run = tmp_path / "run"

    def sigterm(proc, log) -> None:
        os.kill(_train_worker_pid(cluster.workers[-1]), signal.SIGTERM)

    log = _train(cluster, sft, run, ["checkpoint_every=100", "preemption_notice_url=null"], sigterm)
    record = _check_resumed_at_notice(run, log, "sigterm")
    assert len(record["ranks"]) == 1  # only the signalled rank knew; the others followed it
    _check_same_training(run, reference)


def test_aws_spot_notice_from_the_metadata_url(cluster, sft: Path, reference, tmp_path: Path) -> None:
    cluster.ensure_workers(1)
    doomed = cluster.workers[-1]
    doomed_id = _worker_node_id(cluster)
    # Only the worker node's VM is reclaimed: its processes get the notice, the head's get 404.
    server = MetadataServer(notice_for=lambda pid: pid in doomed.processes())
    run = tmp_path / "run"
    placed: dict[str, object] = {}

    def announce(proc, log) -> None:
        server.announce(90)
        # The instance "goes" once the notice is handled: stop answering, as the replacement would.
        _wait_for("the preemption record", lambda: bool(_preemptions(run)), proc, log)
        server.document = None
        # The watcher told Ray: the node is draining, or already gone (a drained raylet exits once idle).
        placed["doomed_in_ray"] = ("draining" if doomed_id in _draining_nodes(cluster)
                                   else "alive" if doomed_id in cluster.alive_nodes() else "gone")
        placed["actors_before"] = _train_actors(cluster)  # the notified group's, and earlier runs'
        alive = set(cluster.alive_nodes())
        placed["replacement"] = cluster.add_worker()  # the autoscaler's replacement
        placed["replacement_id"] = next(iter(set(cluster.alive_nodes()) - alive))
        step = _preemptions(run)[0]["step"]
        _wait_for("a step of the restarted group", lambda: any(r["start_step"] == step for r in _rows(run)), proc, log)

    try:
        log = _train(cluster, sft, run, ["checkpoint_every=100", f"preemption_notice_url={server.url}"], announce)
    finally:
        server.close()
        _lose(cluster, doomed, doomed_id)  # the cloud takes it at the deadline
        # The next test gets a fresh node: Ray (2.60) can leak the CPU of a placement-group bundle
        # removed while it was being placed on a node that had just joined (seen here: Ray Train's
        # first try at the restarted group timed out while the replacement started, and the next
        # run's group waited forever for that CPU, held by a REMOVED group).
        if placed.get("replacement") in cluster.workers:
            cluster.kill_worker(placed["replacement"])
    record = _check_resumed_at_notice(run, log, "aws")
    assert 60 < record["seconds_left"] <= 90
    assert len(record["ranks"]) == 1  # only the rank on the reclaimed VM had the notice
    assert server.tokens_issued >= 1  # IMDSv2: the GETs carried a session token
    # Ray knew the node was going, so the restarted group went to the replacement, not back to it.
    assert record["ray_drain"] == "drained"
    # (Ray's record of the actors: the restarted group's last steps can be over within a poll)
    restarted = {a: n for a, n in _train_actors(cluster).items() if a not in placed["actors_before"]}
    assert placed["doomed_in_ray"] in ("draining", "gone"), placed
    assert placed["replacement_id"] in restarted.values() and doomed_id not in restarted.values(), \
        (restarted, placed["replacement_id"], doomed_id)
    _check_same_training(run, reference)


def _draining_nodes(cluster) -> dict[str, int]:
    """Ray's draining nodes (node id hex -> deadline in ms), from the GCS."""
    script = ("import json, logging, ray, ray._private.state; ray.init(logging_level=logging.ERROR, log_to_driver=False); "
              "print(json.dumps(dict(ray._private.state.state.get_draining_nodes())))")
    out = subprocess.run([sys.executable, "-c", script], env=_env(cluster), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _lose(cluster, node: raycluster.Node, node_id: str) -> None:
    """The node is gone for good: killed if it still runs, and no longer alive in Ray."""
    if node in cluster.workers:
        cluster.workers.remove(node)
        cluster.lost.append(node)
    node.kill()
    deadline = time.time() + 120
    while node_id in cluster.alive_nodes() and time.time() < deadline:
        time.sleep(1)


def _train_actors(cluster) -> dict[str, str]:
    """Every RayTrainWorker actor Ray has a record of, dead ones included: actor id -> node id
    (State API of the head's dashboard)."""
    script = ("import json; from ray.util.state import list_actors; "
              f"actors = list_actors(address='{cluster.dashboard}', filters=[('class_name', '=', 'RayTrainWorker')], "
              "limit=10000, raise_on_missing_output=False); "
              "print(json.dumps({a.actor_id: a.node_id for a in actors}))")
    out = subprocess.run([sys.executable, "-c", script], env=_env(cluster), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _worker_node_id(cluster) -> str:
    script = ("import logging, ray; ray.init(logging_level=logging.ERROR, log_to_driver=False); "
              "print([n['NodeID'] for n in ray.nodes() if n['Alive'] "
              "and 'node:__internal_head__' not in n['Resources']][0])")
    out = subprocess.run([sys.executable, "-c", script], env=_env(cluster), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_ray_drain_of_the_worker_node_then_node_lost(cluster, sft: Path, reference_of, tmp_path: Path) -> None:
    run = tmp_path / "run"
    notice_s, max_steps = 25, 150  # more steps: the `ray drain-node` command alone takes seconds here
    expected = reference_of(max_steps)  # first: its run must not overlap the drained one
    cluster.ensure_workers(1)
    node_id = _worker_node_id(cluster)

    def drain(proc, log) -> None:
        node = cluster.workers[-1]
        out = subprocess.run([raycluster.RAY, "drain-node", f"--address={cluster.address}", f"--node-id={node_id}", "--reason=DRAIN_NODE_REASON_PREEMPTION",
                              "--reason-message=spot reclaim (test)", f"--deadline-remaining-seconds={notice_s}"],
                             env=_env(cluster), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        deadline = time.time() + notice_s
        _wait_for("the preemption record", lambda: bool(_preemptions(run)), proc, log, timeout=notice_s + 30)
        time.sleep(max(0.0, deadline - time.time()))
        cluster.kill_worker(node)  # the cloud takes the node at the deadline
        cluster.add_worker()       # the autoscaler's replacement

    log = _train(cluster, sft, run, ["checkpoint_every=1000", "preemption_notice_url=null"], drain, max_steps)
    record = _check_resumed_at_notice(run, log, "drain", max_steps)
    assert notice_s - 10 < record["seconds_left"] <= notice_s
    assert record["seconds_left_after_save"] < record["seconds_left"]
    _check_same_training(run, expected)  # on the replacement node, exactly as if nothing happened


def test_deadline_shorter_than_the_save_falls_back_to_the_last_checkpoint(cluster, sft: Path, reference,
                                                                          tmp_path: Path) -> None:
    server = MetadataServer()
    run = tmp_path / "run"
    every = 3

    def late_notice(proc, log) -> None:
        snapshot = run / "checkpoint_manager_snapshot.json"
        _wait_for("a periodic checkpoint", lambda: snapshot.is_file() and "checkpoint_000003" in snapshot.read_text(),
                  proc, log)
        server.announce(0)  # the notice came late: no time left for any save
        _wait_for("the preemption record", lambda: bool(_preemptions(run)), proc, log)
        server.document = None

    try:
        # Every node's processes get this notice; not draining them keeps the cluster usable (the
        # AWS test above covers the drain).
        log = _train(cluster, sft, run, [f"checkpoint_every={every}", f"preemption_notice_url={server.url}",
                                         "preemption_drain_node=false"], late_notice)
    finally:
        server.close()
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    (record,) = _preemptions(run)
    assert record["source"] == "aws" and not record["saved"] and record["seconds_left"] <= 0
    assert record["resumes_from"] % every == 0 and record["resumes_from"] < record["step"]
    assert record["last_save_seconds"] > 0
    restarts = {r["start_step"] for r in rows} - {0}
    assert restarts == {record["resumes_from"]}  # the last periodic checkpoint
    assert "too short for a save (the last one took" in log
    assert f"the run resumes from checkpoint_{record['resumes_from']:06d}" in log
    _check_same_training(run, reference)  # the steps after the periodic checkpoint were redone exactly
