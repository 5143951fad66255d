"""Preemption notices on a training worker's node: Ray's node drain, SIGTERM, the cloud's metadata.

Spot and preemptible machines are taken back with a warning: Ray's autoscaler (v2) and KubeRay
drain a node through the GCS (``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION
--deadline-remaining-seconds N`` is the same call), Kubernetes sends SIGTERM and waits the pod's
grace period, AWS publishes ``spot/instance-action`` two minutes ahead in the instance metadata,
and GCP sets ``instance/preempted`` about 30 s ahead. :class:`PreemptionWatcher` notices whichever
comes first. A background thread polls the drain state and the metadata URL; SIGTERM is a signal
handler. Both only set :attr:`PreemptionWatcher.notice`, so the training loop pays one attribute
read per step (``benchmarks/bench_preemption.py`` measures it); the ranks agree on it in the
all-reduce every step already makes (:func:`octoray.training.worker._train_step`).

Nothing here imports Ray at module level: the unit tests drive the watcher without a cluster.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

#: AWS's spot interruption notice (IMDS): 404 until a notice, then {"action": ..., "time": ...}.
AWS_NOTICE_URL = "http://169.254.169.254/latest/meta-data/spot/instance-action"
#: GCP's preemption flag: "FALSE" until the instance is preempted, then "TRUE" (~30 s ahead).
GCP_NOTICE_URL = "http://metadata.google.internal/computeMetadata/v1/instance/preempted"
#: What GCP gives a preempted VM (documented: 30 s of ACPI soft-off before the hard stop).
GCP_NOTICE_S = 30.0
#: The ``preemption_notice_url`` value that picks the URL from the machine's cloud.
NOTICE_URL_AUTO = "auto"


@dataclass(frozen=True)
class Notice:
    """One preemption notice: where it came from, when it was seen, when the node goes."""

    source: str                 # "drain", "sigterm", "aws" (an instance-action document) or "gcp" (TRUE)
    received: float             # Unix seconds this process saw it
    deadline: Optional[float]   # Unix seconds the node is taken away; None when nobody said
    detail: str = ""

    def seconds_left(self, now: Optional[float] = None) -> Optional[float]:
        """Seconds until the deadline (negative once past), or None without one."""
        if self.deadline is None:
            return None
        return self.deadline - (time.time() if now is None else now)

    def record(self) -> dict:
        return asdict(self)


def notice_url(setting: Optional[str]) -> Optional[str]:
    """The metadata URL to poll for ``preemption_notice_url``: ``auto`` is AWS's on EC2, GCP's on
    GCE and nothing elsewhere (polling 169.254.169.254 off AWS would only time out); None is
    nothing; anything else is a URL answering AWS's document or GCP's TRUE/FALSE."""
    if setting is None:
        return None
    if setting != NOTICE_URL_AUTO:
        return setting
    cloud = detect_cloud()
    return {"aws": AWS_NOTICE_URL, "gcp": GCP_NOTICE_URL}.get(cloud or "")


def detect_cloud() -> Optional[str]:
    """``aws`` or ``gcp`` from the machine's DMI strings (no network), else None."""
    def read(path: str) -> str:
        try:
            return Path(path).read_text(errors="replace").strip().lower()
        except OSError:
            return ""

    dmi = " ".join(read(f"/sys/class/dmi/id/{name}") for name in ("sys_vendor", "board_vendor", "product_name"))
    if "amazon" in dmi or read("/sys/hypervisor/uuid").startswith("ec2"):
        return "aws"
    if "google" in dmi:
        return "gcp"
    return None


def parse_notice(body: str, url: str, received: float) -> Optional[Notice]:
    """A Notice from a metadata answer (status 200), or None when it says "not preempted".

    AWS: ``{"action": "terminate"|"stop"|"hibernate", "time": "2026-12-03T15:02:00Z"}``.
    GCP: ``TRUE`` / ``FALSE``.
    """
    text = body.strip()
    if text.upper() in ("TRUE", "FALSE"):
        if text.upper() == "FALSE":
            return None
        return Notice("gcp", received, received + GCP_NOTICE_S, f"{url} says TRUE")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or doc.get("action") not in ("terminate", "stop", "hibernate"):
        return None
    deadline = None
    if doc.get("time"):
        try:
            deadline = datetime.fromisoformat(str(doc["time"]).replace("Z", "+00:00")).timestamp()
        except ValueError:
            deadline = None
    return Notice("aws", received, deadline, f"{url}: {doc['action']} at {doc.get('time')}")


def draining_deadline(node_id: str) -> Optional[float]:
    """This node's drain deadline from Ray's GCS: None when not draining, 0.0 when draining without
    a deadline, else Unix seconds.

    The one place octoray reads Ray's drain state: ``ray._private.state.state.get_draining_nodes()``
    is not a public API (Ray Serve, Ray Data and Ray Train's own preemption watcher call it the same
    way); it maps node id hex to the deadline in ms, 0 meaning none.
    """
    import ray._private.state

    deadline_ms = (ray._private.state.state.get_draining_nodes() or {}).get(node_id)
    if deadline_ms is None:
        return None
    return deadline_ms / 1000.0


def drain_node(node_id: str, notice: Notice) -> Optional[str]:
    """Ask Ray's GCS to drain ``node_id`` for preemption until ``notice``'s deadline (what
    ``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`` sends): Ray then places no new work
    there, so a restarted worker group goes to the other nodes or a replacement, not back onto
    the VM the cloud is taking. None when accepted, else the GCS's reason.

    ``GcsClient.drain_node`` (the connected worker's client) is not a public API; ``ray
    drain-node``, the autoscaler (v2) and Ray's own SIGTERM handler of a node call it the same way.
    """
    import ray._private.worker
    from ray.core.generated import autoscaler_pb2

    deadline_ms = int(notice.deadline * 1000) if notice.deadline else 0  # 0: no deadline
    accepted, why = ray._private.worker.global_worker.gcs_client.drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        f"octoray: {notice.source} preemption notice ({notice.detail})", deadline_ms, timeout=5)
    return None if accepted else (why or "rejected")


class PreemptionWatcher:
    """Notices a preemption of this worker's node; :attr:`notice` is the first one seen (or None).

    ``drain``: a function of no arguments returning this node's drain deadline as
    :func:`draining_deadline` does (None: not draining), or None to skip the drain check.
    ``url``: the metadata URL to poll (see :func:`notice_url`), or None.
    ``sigterm_grace_s``: the deadline a SIGTERM implies (Kubernetes' terminationGracePeriodSeconds).
    ``on_cloud_notice``: called (in the poll thread) with a notice from the metadata URL, e.g.
    :func:`drain_node` for this node, so Ray learns what only the cloud told this VM; it returns
    None or why it could not act (logged).
    """

    def __init__(self, *, poll_s: float = 5.0, drain: Optional[Callable[[], Optional[float]]] = None,
                 url: Optional[str] = None, sigterm_grace_s: float = 30.0, http_timeout_s: float = 2.0,
                 on_cloud_notice: Optional[Callable[[Notice], Optional[str]]] = None) -> None:
        self.poll_s = poll_s
        self.drain = drain
        self.url = url
        self.on_cloud_notice = on_cloud_notice
        #: What on_cloud_notice did: None (not called), "drained", or why it did not.
        self.cloud_action: Optional[str] = None
        self.sigterm_grace_s = sigterm_grace_s
        self.http_timeout_s = http_timeout_s
        self.notice: Optional[Notice] = None  # written once (GIL: a plain attribute is enough)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._token: Optional[str] = None
        self._token_at = 0.0
        self._warned: set[str] = set()

    # -- notices ------------------------------------------------------------------------------
    def signal(self, notice: Notice) -> None:
        """Record ``notice`` unless one is already recorded (the first notice wins)."""
        with self._lock:
            if self.notice is not None:
                return
            self.notice = notice
        left = notice.seconds_left()
        logger.warning("preemption notice (%s): %s; %s", notice.source, notice.detail or "no detail",
                       f"node goes in {left:.1f} s" if left is not None else "no deadline given")

    def on_sigterm(self) -> None:
        now = time.time()
        self.signal(Notice("sigterm", now, now + self.sigterm_grace_s,
                           f"SIGTERM; assuming a grace period of {self.sigterm_grace_s:g} s"))

    # -- polling ------------------------------------------------------------------------------
    def start(self) -> "PreemptionWatcher":
        """Start the background poll (when there is anything to poll); returns self."""
        if (self.drain is not None or self.url is not None) and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="octoray-preemption", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.http_timeout_s * 2 + 1)
            self._thread = None

    def poll_once(self) -> Optional[Notice]:
        """Check the drain state and the metadata URL once; the recorded notice, if any."""
        if self.drain is not None:
            try:
                deadline = self.drain()
            except Exception as exc:  # noqa: BLE001 - a GCS hiccup must not kill the watcher
                self._warn_once("drain", f"cannot read Ray's drain state ({exc}); retrying")
            else:
                if deadline is not None:
                    self.signal(Notice("drain", time.time(), deadline or None, "Ray drains this node"))
        if self.url is not None and self.notice is None:
            notice = self._fetch()
            if notice is not None:
                # Tell Ray first (one GCS call, milliseconds), so the record the ranks save with
                # says whether it took; the step loop sees the notice right after.
                self._act_on(notice)
                self.signal(notice)
        return self.notice

    def _act_on(self, notice: Notice) -> None:
        """Run ``on_cloud_notice`` for a notice from the metadata URL (never raises)."""
        if self.on_cloud_notice is None or self.notice is not None:
            return
        try:
            why = self.on_cloud_notice(notice)
        except Exception as exc:  # noqa: BLE001 - the save on the notice matters more than the drain
            why = f"{type(exc).__name__}: {exc}"
        self.cloud_action = "drained" if why is None else f"not drained: {why}"
        if why is None:
            logger.warning("preemption watcher: asked Ray to drain this node (reason PREEMPTION) until the "
                           "notice's deadline: no new work is placed here")
        else:
            logger.warning("preemption watcher: could not drain this node in Ray (%s); a restarted worker "
                           "group may be placed here again", why)

    def _loop(self) -> None:
        while not self._stop.is_set() and self.notice is None:
            self.poll_once()
            self._stop.wait(self.poll_s)

    def _fetch(self) -> Optional[Notice]:
        assert self.url is not None
        headers = {"Metadata-Flavor": "Google"}  # GCP requires it; AWS ignores it
        token = self._imds_token()
        if token:
            headers["X-aws-ec2-metadata-token"] = token
        request = urllib.request.Request(self.url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.http_timeout_s) as response:
                body = response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as exc:
            if exc.code == 401:  # an IMDSv2 token that expired: fetch a new one next time
                self._token = None
            elif exc.code != 404:  # 404 is AWS's "no interruption scheduled"
                self._warn_once("http", f"{self.url} answered {exc.code}")
            return None
        except (OSError, ValueError) as exc:
            self._warn_once("url", f"cannot reach {self.url} ({exc}); retrying")
            return None
        return parse_notice(body, self.url, time.time())

    def _imds_token(self) -> Optional[str]:
        """An IMDSv2 session token (PUT /latest/api/token), renewed hourly; None where the server
        has no token endpoint (GCP, IMDSv1, a test server): the GET then goes without one."""
        if "computeMetadata" in (self.url or ""):
            return None
        if self._token is not None and time.time() - self._token_at < 3600:
            return self._token
        parts = urlsplit(self.url or "")
        request = urllib.request.Request(f"{parts.scheme}://{parts.netloc}/latest/api/token", method="PUT",
                                         headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
        try:
            with urllib.request.urlopen(request, timeout=self.http_timeout_s) as response:
                self._token = response.read().decode().strip() or None
        except (OSError, ValueError):
            self._token = None
        self._token_at = time.time()
        return self._token

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("preemption watcher: %s", message)


# -- SIGTERM ---------------------------------------------------------------------------------
_WATCHERS: list[PreemptionWatcher] = []
_PREVIOUS: dict[str, object] = {}


def _on_sigterm(signum: int, frame: object) -> None:
    """First SIGTERM: a notice for every live watcher. A second one (or none watching): the
    handler that was there before (Ray's worker exits), so a stuck process still goes."""
    live = [w for w in _WATCHERS if w.notice is None]
    if live:
        for watcher in live:
            watcher.on_sigterm()
        return
    previous = _PREVIOUS.get("handler")
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        raise SystemExit(128 + signum)


def install_sigterm_handler() -> None:
    """Route SIGTERM to :func:`_on_sigterm` (main thread only, as Python requires); idempotent."""
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        return
    _PREVIOUS["handler"] = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _on_sigterm)


def watch_sigterm(watcher: PreemptionWatcher) -> bool:
    """Have SIGTERM to this process notify ``watcher``; False when no handler could be installed.

    Python sets signal handlers from the main thread only, and Ray Train runs the training
    function in a thread of its worker actor; that actor runs its tasks on the main thread, so
    from there the handler is installed through a task on the actor itself.
    """
    _WATCHERS.append(watcher)
    if threading.current_thread() is threading.main_thread():
        install_sigterm_handler()
        return True
    try:
        import ray

        actor = ray.get_runtime_context().current_actor
        ray.get(actor.execute.remote(install_sigterm_handler), timeout=60)
        return True
    except Exception as exc:  # noqa: BLE001 - no handler: the drain and metadata sources still work
        logger.warning("preemption watcher: SIGTERM not watched (%s)", exc)
        return False


def unwatch(watcher: PreemptionWatcher) -> None:
    """Stop ``watcher`` and drop it from the SIGTERM fan-out."""
    watcher.stop()
    if watcher in _WATCHERS:
        _WATCHERS.remove(watcher)
