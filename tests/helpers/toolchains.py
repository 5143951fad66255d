"""Toolchain doubles built from the real ones: what a machine that lacks one piece looks like."""

from __future__ import annotations

from pathlib import Path


def registry_without(tmp_path: Path, crate: str) -> Path:
    """A copy (by symlinks) of Debian's cargo registry lacking ``crate``: what a machine without
    regex's ``+default`` packages looks like to cargo."""
    from octoray.evaluation.sandbox import toolchains
    registry = tmp_path / "registry"
    registry.mkdir()
    for entry in toolchains.DEBIAN_CARGO_REGISTRY.iterdir():
        if not entry.name.startswith(f"{crate}-"):
            (registry / entry.name).symlink_to(entry)
    return registry
