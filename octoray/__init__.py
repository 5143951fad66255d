"""octoray: the OctoPack recipe (CommitPack -> CommitPackFT -> OctoCoder -> HumanEvalPack) on Ray.

Importing this package is cheap on purpose: torch, transformers, deepspeed and ray are imported
inside the stages that need them, so `octoray --help` and the config tooling start instantly.
"""

__version__ = "0.1.0"
