"""The config of ``octoray pipeline``: the ``pipeline:`` section of a jobs/ YAML file (a leaf:
imports nothing from octoray.pipeline)."""

from __future__ import annotations

from dataclasses import dataclass

from octoray.config import option
from octoray.storage.layout import STAGES


@dataclass(frozen=True)
class PipelineConfig:
    """The ``pipeline:`` section of a jobs/ YAML file."""

    name: str = option("demo", "run name")
    out: str = option("", "root of every stage's output: a path, a shared mount or a URI such as "
                          "s3://bucket/runs/demo (default runs/<name>)")
    sources: tuple[str, ...] = option((".",), "repositories to mine (paths, URLs or list files)")
    stages: tuple[str, ...] = option(("mine", "filter", "train", "serve", "eval", "report"),
                                     "stages to run, in pipeline order (add 'tune' to search hyperparameters first; "
                                     "the train stage then trains with the best trial's)")
    humanevalpack_dir: str | None = option(None, "directory of HumanEvalPack <language>.jsonl files "
                                                 "(default: the hub dataset bigcode/humanevalpack)")
    allow_code_execution: bool = option(True, "the eval stage executes generated code in the sandbox; "
                                              "false refuses, as 'octoray eval' does without the flag")
    latency_requests: int = option(32, "requests of the serving-latency probe run after evaluation")
    latency_concurrency: int = option(4, "concurrent requests of the latency probe")

    def problems(self) -> list[str]:
        """Every invalid value, as messages."""
        found = [f"stages: unknown '{s}' (choose from {', '.join(STAGES)})" for s in self.stages if s not in STAGES]
        if "eval" in self.stages and "serve" not in self.stages:
            found.append("stages: 'eval' queries the served model, so it needs 'serve'")
        if self.latency_requests < 1 or self.latency_concurrency < 1:
            found.append("latency_requests and latency_concurrency must be >= 1")
        return found
