"""Per-step training metrics: JSONL + TensorBoard on rank 0, MFU, and the loss-curve PNG.

Ray Train V2 keeps only metrics reported together with a checkpoint, so octoray logs every step
itself. A resumed run truncates ``metrics.jsonl`` back to the checkpoint it restarts from, so the
file holds each step exactly once however many times the workers restarted.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from octoray.storage.layout import LOSS_PNG, METRICS_FILE  # noqa: F401 - LOSS_PNG: for the run directory's users

TB_DIR = "tb"

#: Dense bf16 peak FLOP/s per GPU by device-name fragment (vendor datasheets, no sparsity).
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("A10G", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("V100", 125e12),  # fp16 tensor cores; V100 has no bf16
)


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU named ``device_name``, or None when unknown."""
    for fragment, flops in PEAK_BF16_FLOPS:
        if fragment.lower() in device_name.lower():
            return flops
    return None


def mfu(n_params: int, tokens_per_s_per_device: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation ``6 * N * tokens/s / peak`` (PaLM's estimate), None without a peak."""
    if not peak or tokens_per_s_per_device <= 0:
        return None
    return 6.0 * n_params * tokens_per_s_per_device / peak


class PeakMemory:
    """The most memory this worker has held for training since it was created.

    On a GPU: PyTorch's ``max_memory_allocated`` (what ``octoray plan`` predicts, without the CUDA
    context). On CPU: the process's peak resident set (``VmHWM``, reset to the current size when
    the tracker starts, so the imports and Ray's own memory are left out) minus the size then,
    with glibc told to hand freed memory back at once (:func:`_return_freed_memory`), so the
    resident set follows what is live rather than what the heap once grew to.
    """

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.baseline = 0
        else:
            _return_freed_memory()
            _reset_peak_rss()
            self.baseline = _status_bytes("VmRSS:")

    def peak_bytes(self) -> int:
        """Peak bytes since the tracker started (this process only)."""
        import torch

        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        return max(0, _status_bytes("VmHWM:") - self.baseline)


def _return_freed_memory() -> None:
    """Have glibc hand freed tensors back to the OS (a fixed 128 KiB mmap threshold).

    Its adaptive threshold raises itself to 32 MiB once a large block is freed, so later tensors
    come from the heap, which keeps what they leave behind: the resident set then grows with the
    allocator's history (measured on the demo model: 793 MiB against 628 MiB here), not with what
    training holds. Step times are unchanged within this machine's noise.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: the peak then includes the heap's slack
        pass


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
    except OSError:  # not Linux, or not allowed: the peak then includes what came before
        pass


def _status_bytes(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MetricsLog:
    """Append-only per-step log for rank 0; a no-op on other ranks."""

    def __init__(self, run_dir: Path, *, enabled: bool, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Steps after the checkpoint we resume from are redone; drop their stale lines.
        kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= resume_step]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / TB_DIR), purge_step=resume_step + 1)
        except ImportError:  # tensorboard is optional at runtime; the JSONL log is the record
            self._tb = None

    def log(self, row: dict[str, Any]) -> None:
        """Record one step's metrics (``row["step"]`` is required) with the wall-clock ``time`` it was
        logged at (Unix seconds): the gaps between rows show what the steps do not (checkpoint saves,
        logging), which ``octoray plan --calibrate`` measures."""
        if not self.enabled:
            return
        row = {**row, "time": round(time.time(), 3)}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not math.isnan(float(value)):
                    self._tb.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        """Flush TensorBoard."""
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Any) -> list[dict[str, Any]]:
    """The rows of a metrics JSONL file, local or in object storage (a torn last line from a crash is skipped)."""
    from octoray.storage.locations import location

    path = location(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_loss(metrics_path: Any, png_path: Any) -> bool:
    """Write the loss curve (train, and validation where logged) as a PNG; False if no rows."""
    rows = read_metrics(metrics_path)
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")  # headless: workers and CI have no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    val = [r for r in rows if r.get("val_loss") is not None]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    import io

    from octoray.storage.locations import location
    from octoray.storage.stage_dirs import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(location(png_path), buffer.getvalue())  # local file or one object upload
    return True
