"""On-disk cache of generated answers, so re-running an evaluation or a report regenerates nothing.

The key covers everything that decides an answer: the model fingerprint, the steering rails
(specs plus artifact contents), the rendered prompt text (system prompt and prompt-level
steering included) and the generation settings. The first two are a guardrail's
:class:`Scope`, computed once per guardrail and handed to everything that keys on it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guardrail.artifact.digest import artifact_digest
from guardrail.cache import cache_root, digest

if TYPE_CHECKING:
    from guardrail.policy.model import Policy
    from guardrail.steering.guard import Guardrail

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, text TEXT NOT NULL,
       token_ids TEXT NOT NULL, finish_reason TEXT NOT NULL)""",
    # Derived measurements (e.g. per-token KL) that are as expensive as generating.
    "CREATE TABLE IF NOT EXISTS measurements (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


@dataclass
class Answer:
    """One generated answer; ``cached`` says it came from disk rather than the model."""

    text: str
    token_ids: list[int]
    finish_reason: str
    cached: bool = field(default=False, compare=False)


def rails_key(policy: Policy) -> str:
    """Hash of the enabled rails' specs and artifact contents (what steering depends on)."""
    rails = []
    for spec in policy.rails:
        if not spec.enabled:
            continue
        dumped = spec.model_dump(mode="json")
        artifact = spec.energy_model.artifact if spec.energy_model else None
        if artifact and Path(artifact).is_file():
            dumped["energy_model"]["artifact"] = artifact_digest(Path(artifact))
        rails.append(dumped)
    return digest(rails)


@dataclass(frozen=True)
class Scope:
    """What a guardrail's cached answers and measurements depend on besides the prompt."""

    fingerprint: dict[str, Any]
    model_key: str
    rails_key: str

    @classmethod
    def of(cls, guard: Guardrail) -> Scope:
        """The scope of ``guard`` (hashes its artifact files: compute it once, pass it on).

        Besides the policy's rails it covers what the loaded rails resolved from their
        artifacts' calibration (steerer params, gate thresholds).
        """
        resolved = [{"rail": r.name, "steerer": r.steerer.params.model_dump(mode="json"),
                     "below": r.below, "above": r.above} for r in guard.rails]
        return cls(fingerprint=guard.fingerprint, model_key=digest(guard.fingerprint),
                   rails_key=digest([rails_key(guard.policy), resolved]))


class Scopes:
    """Each guardrail's :class:`Scope`, computed on first request only."""

    def __init__(self) -> None:
        self._known: dict[int, Scope] = {}

    def of(self, guard: Guardrail) -> Scope:
        """The scope of ``guard``."""
        if id(guard) not in self._known:
            self._known[id(guard)] = Scope.of(guard)
        return self._known[id(guard)]


def default_cache_path(cache_dir: str | Path | None = None) -> Path:
    """``<cache root>/evaluation/generations.sqlite`` (cache root: :func:`cache_root`)."""
    return cache_root(cache_dir) / "evaluation" / "generations.sqlite"


class GenerationCache:
    """A key -> :class:`Answer` store in one SQLite file; ``path=None`` disables caching."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._db: sqlite3.Connection | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Several evaluations may share the cache; SQLite's locking keeps writes whole.
            self._db = sqlite3.connect(self.path, timeout=60)
            for statement in SCHEMA:
                self._db.execute(statement)
            self._db.commit()

    def _lookup(self, query: str, keys: Iterable[str]) -> dict[str, tuple[Any, ...]]:
        """The row ``query`` (one ``?``, the key) finds for each of ``keys`` that has one."""
        if self._db is None:
            return {}
        found = {}
        for key in set(keys):
            row = self._db.execute(query, (key,)).fetchone()
            if row is not None:
                found[key] = row
        return found

    def get_many(self, keys: Iterable[str]) -> dict[str, Answer]:
        """The cached answers among ``keys``."""
        rows = self._lookup("SELECT text, token_ids, finish_reason FROM answers WHERE key = ?",
                            keys)
        return {k: Answer(r[0], json.loads(r[1]), r[2], cached=True) for k, r in rows.items()}

    def put_many(self, answers: dict[str, Answer]) -> None:
        """Store answers (replacing any with the same key)."""
        if self._db is None or not answers:
            return
        self._db.executemany(
            "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?)",
            [(k, a.text, json.dumps(a.token_ids), a.finish_reason) for k, a in answers.items()],
        )
        self._db.commit()

    def get_values(self, keys: Iterable[str]) -> dict[str, Any]:
        """Cached JSON measurements among ``keys``."""
        rows = self._lookup("SELECT value FROM measurements WHERE key = ?", keys)
        return {k: json.loads(r[0]) for k, r in rows.items()}

    def put_values(self, values: dict[str, Any]) -> None:
        """Store JSON-serialisable measurements."""
        if self._db is None or not values:
            return
        self._db.executemany("INSERT OR REPLACE INTO measurements VALUES (?, ?)",
                             [(k, json.dumps(v)) for k, v in values.items()])
        self._db.commit()

    def __len__(self) -> int:
        if self._db is None:
            return 0
        return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        """Close the database."""
        if self._db is not None:
            self._db.close()
            self._db = None
