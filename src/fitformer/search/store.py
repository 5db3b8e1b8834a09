"""SQLite run store: every evaluated candidate with its plan and metrics, in the run directory.

The store is what makes a search resumable and duplicate-free. Search algorithms are deterministic given
their seed and the metrics they observe, so a rerun after a kill replays the same decisions and finds every
candidate evaluated before the kill here, by key, instead of evaluating it again. Each result is committed
as soon as it arrives, so a kill loses at most the candidates in flight.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from ..errors import UserError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
    key TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    genes TEXT NOT NULL,
    spec TEXT NOT NULL,
    metrics TEXT NOT NULL
);
"""


class RunStore:
    """Candidates keyed by their plan's hash; ``get`` returns stored metrics, ``put`` records new ones."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path))
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{self.path}: not a fitformer run store ({exc}); use a fresh run directory") from None
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_meta(self, meta: dict[str, Any]) -> None:
        """Record the run's settings, or check that a resumed run uses the same ones."""
        stored = dict(self._db.execute("SELECT name, value FROM meta").fetchall())
        if not stored:
            with self._db:
                self._db.executemany("INSERT INTO meta VALUES (?, ?)",
                                     [(k, json.dumps(v, sort_keys=True)) for k, v in meta.items()])
            return
        for name, value in meta.items():
            if name in stored and stored[name] != json.dumps(value, sort_keys=True):
                raise UserError(f"{self.path} holds a run with another {name} ({stored[name]}); "
                                "resume with the same settings or use a new run directory")

    def get(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT metrics FROM candidates WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, genes: tuple[int, ...], spec: dict[str, Any], metrics: dict[str, Any]) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO candidates (key, seq, genes, spec, metrics) "
                "VALUES (?, (SELECT COUNT(*) FROM candidates), ?, ?, ?)",
                (key, json.dumps(list(genes)), json.dumps(spec), json.dumps(metrics)))

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM candidates").fetchone()[0])

    def rows(self) -> list[dict[str, Any]]:
        """Every stored candidate in evaluation order."""
        cur = self._db.execute("SELECT key, seq, genes, spec, metrics FROM candidates ORDER BY seq")
        return [{"key": k, "seq": s, "genes": json.loads(g), "spec": json.loads(p), "metrics": json.loads(m)}
                for k, s, g, p, m in cur.fetchall()]
