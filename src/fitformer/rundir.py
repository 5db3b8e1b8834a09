"""A run directory whose stages are checkpointed with checksums, so a rerun resumes and never trusts a
partial or corrupted file.

Each finished stage is recorded in ``manifest.json`` with the SHA-256 of every file it produced. On a
rerun, a stage whose files all exist and match is skipped; anything else (a crash mid-stage, a truncated or
edited file) makes the stage run again. The manifest itself is written atomically after the stage's files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UserError
from .io import file_lock, read_json, sha256_file, write_json_atomic

MANIFEST = "manifest.json"


class RunDir:
    """A directory holding one run's stages and their manifest."""

    def __init__(self, path: str | Path, config: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {self.path} is a file; pass a directory for the run")
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest = self._read_manifest()
        if config is not None:
            previous = self.manifest.get("config")
            if previous is not None and previous != config:
                raise UserError(
                    f"{self.path} holds a run with a different configuration; use a new --out directory "
                    "to start another run (or the same settings to resume this one)"
                )
            self.manifest["config"] = config
            self._write_manifest()

    def _read_manifest(self) -> dict[str, Any]:
        path = self.path / MANIFEST
        if not path.exists():
            return {"stages": {}}
        try:
            data = read_json(path)
            if not isinstance(data.get("stages"), dict):
                raise ValueError
            return data
        except (ValueError, OSError):
            return {"stages": {}}  # an unreadable manifest means nothing is trusted: stages rerun

    def _write_manifest(self) -> None:
        write_json_atomic(self.path / MANIFEST, self.manifest)

    def file(self, relative: str) -> Path:
        """Absolute path of a file inside the run."""
        return self.path / relative

    def is_done(self, stage: str) -> bool:
        """True when the stage finished and every file it recorded still has its checksum."""
        entry = self.manifest["stages"].get(stage)
        if not entry:
            return False
        for relative, digest in entry["files"].items():
            path = self.path / relative
            if not path.exists() or sha256_file(path) != digest:
                return False
        return True

    def result(self, stage: str) -> Any:
        """The small JSON result a finished stage returned."""
        return self.manifest["stages"][stage]["result"]

    def stage(self, name: str, fn: Callable[[RunDir], tuple[Any, list[str]]], rerun: bool = False) -> Any:
        """Run ``fn`` unless stage ``name`` is already done. ``fn(run)`` returns (JSON result, files written
        relative to the run directory); the files are checksummed into the manifest."""
        with file_lock(self.path / ".lock"):
            self.manifest = self._read_manifest()
            if not rerun and self.is_done(name):
                return self.result(name)
            started = time.time()
            result, files = fn(self)
            self.manifest["stages"][name] = {
                "result": result,
                "files": {f: sha256_file(self.path / f) for f in files},
                "seconds": time.time() - started,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            self._write_manifest()
            return result
