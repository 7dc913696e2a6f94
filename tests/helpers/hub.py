"""A Hugging Face cache on disk, as huggingface_hub lays it out, for tests of amlx.hub."""

from __future__ import annotations

from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(tmp_path: Path) -> tuple[Path, Path]:
    """A cache holding acme/tiny at COMMIT (refs/main, a snapshot with only config.json);
    (the cache's root, the repo's folder)."""
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "snapshots" / COMMIT / "config.json").write_text("{}")
    return cache, repo
