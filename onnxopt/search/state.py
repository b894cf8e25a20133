"""The search's JSON: every candidate with its recipe and figures, written atomically after each one.

Rerunning a search with the same ``--report`` reads it back and evaluates
only what is missing, provided the model, the data and the settings that
change a candidate's figures (budget, seed, threads, latency batch, onnxruntime) are the
same; the passes, the space and the objective may change between runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxopt.errors import OnnxoptError
from onnxopt.report import environment, write_json
from onnxopt.split import SELECTION_SHARE

__all__ = ["SearchState", "fingerprint", "SCHEMA"]

SCHEMA = "onnxopt-search/1"
#: Files up to this size are identified by their SHA-256; larger ones by size and modification time.
HASH_LIMIT = 2**30


def _file_id(path: str | os.PathLike[str] | None) -> str | None:
    if path is None:
        return None
    path = Path(path)
    stat = path.stat()
    if stat.st_size > HASH_LIMIT:
        return f"size={stat.st_size},mtime={int(stat.st_mtime)}"
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(2**20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def fingerprint(model: str | os.PathLike[str], eval_data: str | os.PathLike[str], data: str | os.PathLike[str] | None,
                *, max_drop: float, seed: int, threads: int, latency_batch: int = 1,
                metrics: dict[str, str] | None = None) -> dict[str, Any]:
    """What must match for stored candidates to be reused."""
    import onnxruntime

    # declared drop metrics change every candidate's figure; an empty declaration keeps older JSONs resumable
    extra = {"metrics": dict(sorted(metrics.items()))} if metrics else {}
    return {**extra, "model": _file_id(model), "eval": _file_id(eval_data), "data": _file_id(data), "max_drop": max_drop,
            "seed": seed, "threads": threads, "latency_batch": latency_batch, "onnxruntime": onnxruntime.__version__,
            # candidates are measured on the selection part of --eval (onnxopt.split): older runs measured all of it
            "selection": f"split share {SELECTION_SHARE}",
            # candidates' drops are the budget's (top-1 by 1 - agreement, with a margin): older runs used net accuracy;
            # since wave 4 a cosine/SNR/textmap drop carries a per-sample margin too, which older JSONs lack
            "drop": "budget rule, per-sample margin"}


@dataclass
class SearchState:
    """Everything the search JSON holds; ``save`` after each change."""

    path: Path | None
    fingerprint: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    sessions: list[dict[str, Any]] = field(default_factory=list)
    best: int | None = None
    output: str | None = None
    complete: bool = False
    notes: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, path: Path | None, fp: dict[str, Any], *, restart: bool = False) -> SearchState:
        """The stored state at ``path`` when it belongs to the same search, else a new one.

        A JSON from another model or other data is an error (unless ``restart``):
        its candidates would be silently mixed with new ones.
        """
        state = cls(path, fp)
        if path is None or not path.exists() or restart:
            return state
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise OnnxoptError(f"--report {path} exists but is not a readable search JSON ({err})",
                               "give another --report path, or --restart to overwrite it") from None
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise OnnxoptError(f"--report {path} exists and is not an onnxopt search JSON",
                               "give another --report path, or --restart to overwrite it")
        if doc.get("fingerprint") != fp:
            diff = sorted(k for k in set(fp) | set(doc.get("fingerprint", {})) if fp.get(k) != doc.get("fingerprint", {}).get(k))
            raise OnnxoptError(f"--report {path} is from another search ({', '.join(diff)} differ), so it cannot be resumed",
                               "give another --report path, or --restart to start over")
        state.candidates = [c for c in doc.get("candidates", []) if isinstance(c, dict) and "key" in c]
        state.sessions = list(doc.get("sessions", []))
        return state

    @property
    def session(self) -> int:
        """Number of the current run (1 for the first; a resumed search counts up)."""
        return len(self.sessions)

    def start_session(self) -> None:
        self.sessions.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "evaluated": 0})

    def by_key(self) -> dict[str, dict[str, Any]]:
        return {c["key"]: c for c in self.candidates}

    def add(self, result: dict[str, Any], stage: str) -> dict[str, Any]:
        """Record a finished candidate (numbered in order of completion) and save."""
        entry = {"id": len(self.candidates), "stage": stage, "session": self.session, **result}
        self.candidates.append(entry)
        if self.sessions:
            self.sessions[-1]["evaluated"] += 1
        self.save()
        return entry

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "fingerprint": self.fingerprint, "settings": self.settings, "reference": self.reference,
                "complete": self.complete, "best": self.best, "output": self.output, "notes": self.notes,
                "fronts": {axis: [c["id"] for c in self.candidates if c.get("front", {}).get(axis)] for axis in ("latency", "size")},
                "sessions": self.sessions, "candidates": self.candidates, "environment": environment()}

    def save(self) -> None:
        if self.path is not None:
            write_json(self.to_dict(), self.path)
