"""The preemption watcher without Ray: a real HTTP server answering AWS's IMDSv2 token and
``spot/instance-action`` (and GCP's TRUE/FALSE), real SIGTERMs to this process, a drain-state
function standing in for Ray's GCS, and the save-or-fall-back decision the worker group takes.

The cluster tier (tests/cluster/test_preemption_cluster.py) runs the same sources against real
``ray start`` nodes and a training run."""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime, timezone

import pytest

from octoray.config import ConfigError, from_mapping
from octoray.training import preemption
from octoray.training.preemption import Notice, PreemptionWatcher, notice_url, parse_notice
from octoray.training.train_config import TrainConfig
from octoray.training.worker import _preemption_decision, _preemption_line
from tests.helpers.metadata import MetadataServer


@pytest.fixture
def metadata():
    server = MetadataServer()
    yield server
    server.close()


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_aws_notice_over_imdsv2_is_seen_by_the_poll_thread(metadata) -> None:
    watcher = PreemptionWatcher(poll_s=0.05, url=metadata.url).start()
    try:
        _wait(lambda: metadata.gets >= 3)
        assert watcher.notice is None  # 404: no interruption scheduled
        assert metadata.tokens_issued == 1  # one token, reused
        deadline = metadata.announce(120)
        _wait(lambda: watcher.notice is not None)
    finally:
        watcher.stop()
    notice = watcher.notice
    assert notice.source == "aws" and notice.deadline == deadline
    assert 100 < notice.seconds_left() <= 120
    assert "terminate" in notice.detail and metadata.url in notice.detail
    gets = metadata.gets
    time.sleep(0.2)
    assert metadata.gets == gets  # the thread stops polling once it has a notice


def test_imdsv1_server_without_token_endpoint_still_works() -> None:
    server = MetadataServer(require_token=False)
    try:
        server.announce(30, action="stop")
        watcher = PreemptionWatcher(url=server.url)
        assert watcher.poll_once() is not None and watcher.notice.source == "aws"
    finally:
        server.close()


def test_unreachable_url_warns_once_and_keeps_running(caplog) -> None:
    watcher = PreemptionWatcher(url="http://127.0.0.1:9/latest/meta-data/spot/instance-action", http_timeout_s=0.5)
    with caplog.at_level("WARNING"):
        assert watcher.poll_once() is None
        assert watcher.poll_once() is None
    assert sum("cannot reach" in r.getMessage() for r in caplog.records) == 1


def test_parse_notice_formats() -> None:
    aws = parse_notice('{"action": "terminate", "time": "2026-12-03T15:02:00Z"}', "http://x/", 1.0)
    assert aws.source == "aws" and aws.deadline == datetime(2026, 12, 3, 15, 2, tzinfo=timezone.utc).timestamp()
    assert parse_notice("TRUE\n", preemption.GCP_NOTICE_URL, 100.0) == Notice(
        "gcp", 100.0, 100.0 + preemption.GCP_NOTICE_S, f"{preemption.GCP_NOTICE_URL} says TRUE")
    assert parse_notice("FALSE", preemption.GCP_NOTICE_URL, 1.0) is None
    assert parse_notice('{"action": "none"}', "http://x/", 1.0) is None
    assert parse_notice("<html>", "http://x/", 1.0) is None
    no_time = parse_notice('{"action": "hibernate"}', "http://x/", 1.0)
    assert no_time.deadline is None and no_time.seconds_left() is None


def test_notice_url_settings() -> None:
    assert notice_url(None) is None
    assert notice_url("http://127.0.0.1:1/x") == "http://127.0.0.1:1/x"
    expected = {"aws": preemption.AWS_NOTICE_URL, "gcp": preemption.GCP_NOTICE_URL}.get(preemption.detect_cloud() or "")
    assert notice_url("auto") == expected


def test_drain_state_with_and_without_deadline(caplog) -> None:
    state: dict = {"deadline": None, "fail": True}

    def drain():
        if state["fail"]:
            raise ConnectionError("GCS unavailable")
        return state["deadline"]

    watcher = PreemptionWatcher(drain=drain)
    with caplog.at_level("WARNING"):
        assert watcher.poll_once() is None and watcher.poll_once() is None
    assert sum("drain state" in r.getMessage() for r in caplog.records) == 1  # once, then quiet
    state["fail"] = False
    assert watcher.poll_once() is None  # not draining
    state["deadline"] = time.time() + 30
    notice = watcher.poll_once()
    assert notice.source == "drain" and notice.deadline == state["deadline"]
    state["deadline"] = 0.0  # a later poll cannot replace the first notice
    assert watcher.poll_once() is notice
    undated = PreemptionWatcher(drain=lambda: 0.0).poll_once()
    assert undated.source == "drain" and undated.deadline is None  # draining, no deadline (0 ms)


def test_sigterm_notices_then_a_second_one_goes_to_the_previous_handler() -> None:
    seen: list[int] = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    watcher = PreemptionWatcher(sigterm_grace_s=25)
    try:
        assert preemption.watch_sigterm(watcher)  # main thread: installed directly
        os.kill(os.getpid(), signal.SIGTERM)
        _wait(lambda: watcher.notice is not None)
        assert watcher.notice.source == "sigterm" and 24 < watcher.notice.seconds_left() <= 25
        assert seen == []  # the first SIGTERM is a notice, not an exit
        os.kill(os.getpid(), signal.SIGTERM)
        _wait(lambda: seen == [signal.SIGTERM])  # the handler that was there before (Ray's: exit)
    finally:
        preemption.unwatch(watcher)
        signal.signal(signal.SIGTERM, original)


def test_per_step_cost_is_an_attribute_read() -> None:
    watcher = PreemptionWatcher()
    started = time.perf_counter()
    for _ in range(100_000):
        if watcher is not None and watcher.notice is not None:
            break
    per_check = (time.perf_counter() - started) / 100_000
    assert per_check < 20e-6  # ~50 ns here; a training step is milliseconds or more


def test_decision_saves_when_the_deadline_allows_and_falls_back_otherwise() -> None:
    now = time.time()
    notices = [Notice("sigterm", now - 1, now + 30, "SIGTERM").record(), Notice("drain", now, now + 20, "drain").record()]
    record = _preemption_decision(notices, [1, 2], step=12, saved={"step": 10, "seconds": 4.0})
    assert record["saved"] and record["resumes_from"] == 12 and record["source"] == "sigterm"
    assert record["sources"] == ["drain", "sigterm"] and 19 < record["seconds_left"] <= 20  # earliest deadline
    assert "saved checkpoint_000012" in _preemption_line(record)

    short = [Notice("aws", now, now + 2, "terminate").record()]
    record = _preemption_decision(short, [0], step=13, saved={"step": 10, "seconds": 4.0})
    assert not record["saved"] and record["resumes_from"] == 10
    line = _preemption_line(record)
    assert "too short for a save (the last one took 4.0 s)" in line and "checkpoint_000010" in line

    # No save measured yet in this worker group: try one rather than lose the steps.
    record = _preemption_decision(short, [0], step=3, saved={"step": None, "seconds": None})
    assert record["saved"] and record["deadline"] == now + 2


def test_config_checks_the_preemption_options() -> None:
    with pytest.raises(ConfigError) as err:
        from_mapping(TrainConfig, {"preemption_notice_url": "169.254.169.254", "preemption_poll_s": 0,
                                   "preemption_sigterm_grace_s": -1})
    text = str(err.value)
    assert "preemption_notice_url must be auto, null or an http(s) URL" in text
    with pytest.raises(ConfigError, match="write null to poll no URL"):
        from_mapping(TrainConfig, {"preemption_notice_url": False})  # YAML's `off`
    assert from_mapping(TrainConfig, {"preemption_notice_url": None}).preemption_notice_url is None
    assert "preemption_poll_s must be > 0" in text and "preemption_sigterm_grace_s must be > 0" in text


def test_a_cloud_notice_is_passed_on_once_and_a_failure_to_drain_is_logged(metadata, caplog) -> None:
    calls: list[Notice] = []
    watcher = PreemptionWatcher(url=metadata.url, on_cloud_notice=lambda n: calls.append(n))
    assert watcher.poll_once() is None and calls == [] and watcher.cloud_action is None  # no notice yet
    metadata.announce(60)
    notice = watcher.poll_once()
    assert calls == [notice] and watcher.cloud_action == "drained"
    watcher.poll_once()
    assert len(calls) == 1  # once per notice

    def refuse(notice):
        raise ConnectionError("GCS unavailable")

    failing = PreemptionWatcher(url=metadata.url, on_cloud_notice=refuse)
    with caplog.at_level("WARNING"):
        assert failing.poll_once() is not None  # the notice stands: the save matters more than the drain
    assert failing.cloud_action == "not drained: ConnectionError: GCS unavailable"
    assert any("could not drain this node in Ray" in r.getMessage() for r in caplog.records)


def test_drain_and_sigterm_notices_are_not_passed_on() -> None:
    calls: list = []
    drained = PreemptionWatcher(drain=lambda: time.time() + 30, on_cloud_notice=calls.append)
    assert drained.poll_once().source == "drain"  # Ray knows already
    watcher = PreemptionWatcher(on_cloud_notice=calls.append)
    watcher.on_sigterm()
    assert watcher.notice.source == "sigterm" and calls == []
