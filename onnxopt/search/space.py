"""The search space: for each pass, the settings a search tries, as data.

A pass's settings are either a *ladder* (ordered from light to aggressive:
a setting that breaks the budget alone ends the ladder, and any chain at
least that aggressive is not tried) or *alternatives* (unordered, e.g.
calibration methods: each is tried). ``fixed`` keys go with every setting.
A TOML file given with ``--space`` replaces the entries it names::

    [prune]
    kind = "ladder"
    fixed = { saliency = "reconstruct" }
    settings = [{ ratio = 0.25 }, { ratio = 0.5 }]
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from onnxopt.config import build_config
from onnxopt.errors import OnnxoptError
from onnxopt.plugins import Registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["PassSpace", "Space", "DEFAULT_SPACE", "PRUNE_TARGET", "BASE_PASS", "build_space", "default_entry",
           "load_space_file", "settings_key"]

#: The lossless clean-up every candidate starts from (BatchNorm folding helps every later pass).
BASE_PASS = "fold"


def settings_key(settings: Mapping[str, Any]) -> str:
    """A canonical text of one pass's settings (sorted keys), used in candidate keys."""
    return json.dumps(dict(settings), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class PassSpace:
    """The settings of one pass a search tries."""

    kind: Literal["ladder", "alternatives"]
    settings: tuple[dict[str, Any], ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    #: the pass reads ``ctx.max_drop`` (accuracy-driven fallback, rank search): it gets what is left of the budget
    uses_budget: bool = False

    def resolved(self) -> list[dict[str, Any]]:
        """Each setting merged with the fixed keys, in order."""
        return [{**self.fixed, **s} for s in self.settings]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "fixed": self.fixed, "settings": list(self.settings), "uses_budget": self.uses_budget}


#: What `onnxopt search` tries per pass unless --space says otherwise. Ladders run light to aggressive.
DEFAULT_SPACE: dict[str, PassSpace] = {
    # reconstruct saliency refits the next layer on --data: it keeps most accuracy at high ratios; the
    # sensitivity scan spreads the cut over the groups where it costs least, to a share of the parameters
    # (objective size) or, with --objective latency, of the MACs (see PRUNE_TARGET)
    "prune": PassSpace("ladder", tuple({"target_params": t} for t in (0.5, 0.35, 0.25, 0.2, 0.15, 0.1)),
                       fixed={"saliency": "reconstruct", "distribution": "sensitivity"}),
    "lowrank": PassSpace("ladder", tuple({"energy": e} for e in (0.99, 0.95, 0.9, 0.8)), fixed={"method": "activation"},
                         uses_budget=True),
    # packed storage: 8, 4 and 2-bit indices (k=64 or 8 would take the same bits as 256 or 16 for less accuracy);
    # a codebook per output channel keeps more accuracy than one per tensor for a little more size
    "cluster": PassSpace("ladder", ({"k": 256}, {"k": 16, "granularity": "channel"}, {"k": 16}, {"k": 4, "granularity": "channel"},
                                    {"k": 4}), fixed={"mode": "packed", "init": "optimal"}),
    # the accuracy-driven fallback returns sensitive nodes to float within what is left of the budget
    "quant": PassSpace("alternatives", tuple({"method": m} for m in ("minmax", "percentile", "entropy")),
                       fixed={"fallback": True}, uses_budget=True),
}


#: The prune key each objective's ladder sets: what the pruned model keeps a share of.
PRUNE_TARGET = {"size": "target_params", "latency": "target_macs"}


def default_entry(name: str, objective: str = "size") -> PassSpace | None:
    """The default space of a pass for an objective (prune cuts what the objective counts)."""
    entry = DEFAULT_SPACE.get(name)
    if entry is None or name != "prune":
        return entry
    key = PRUNE_TARGET[objective]
    return PassSpace(entry.kind, tuple({key: s["target_params"]} for s in entry.settings), dict(entry.fixed), entry.uses_budget)


@dataclass(frozen=True)
class Space:
    """The passes of a search, in chain order, with their settings."""

    passes: tuple[str, ...]
    entries: dict[str, PassSpace]

    def index(self, pass_name: str, settings: Mapping[str, Any]) -> int | None:
        """Position of ``settings`` in the pass's list (its aggressiveness on a ladder), None if not in it."""
        key = settings_key(settings)
        for i, s in enumerate(self.entries[pass_name].resolved()):
            if settings_key(s) == key:
                return i
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"passes": list(self.passes), "entries": {p: self.entries[p].to_dict() for p in self.passes}}


def load_space_file(path: str | os.PathLike[str]) -> dict[str, PassSpace]:
    """Read a ``--space`` TOML file: one table per pass with ``kind``, ``settings`` and optional ``fixed``."""
    path = Path(path)
    if not path.is_file():
        raise OnnxoptError(f"search space {path}: no such file", "check the --space path")
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise OnnxoptError(f"search space {path} is not valid TOML ({err})", "fix the syntax") from None
    out = {}
    for name, table in doc.items():
        if not isinstance(table, dict) or not isinstance(table.get("settings"), list) or not table["settings"] \
                or not all(isinstance(s, dict) for s in table["settings"]):
            raise OnnxoptError(f"search space {path}: [{name}] needs a non-empty list of tables 'settings'",
                               "e.g. settings = [{ ratio = 0.25 }, { ratio = 0.5 }]")
        kind = table.get("kind", "ladder")
        if kind not in ("ladder", "alternatives"):
            raise OnnxoptError(f"search space {path}: [{name}] kind {kind!r} is not ladder or alternatives",
                               "ladder: light to aggressive; alternatives: unordered")
        fixed = table.get("fixed", {})
        if not isinstance(fixed, dict):
            raise OnnxoptError(f"search space {path}: [{name}] fixed must be a table", "e.g. fixed = { mode = \"packed\" }")
        default = DEFAULT_SPACE.get(name)
        out[name] = PassSpace(kind, tuple(dict(s) for s in table["settings"]), dict(fixed),
                              bool(table.get("uses_budget", default.uses_budget if default else False)))
    return out


def build_space(registry: Registry, passes: Sequence[str], overrides: Mapping[str, PassSpace] | None = None,
                objective: str = "size") -> Space:
    """The space for ``passes`` (defaults, replaced by ``overrides``), every setting checked against its pass's config.

    A pass with no entry is tried once with its defaults; the final pass
    (quantization) goes last whatever the order given.
    """
    names = [p.strip() for p in passes if p.strip()]
    if not names:
        raise OnnxoptError("no pass to search over", "give --passes, e.g. --passes prune,cluster,quant")
    if len(set(names)) != len(names):
        raise OnnxoptError(f"--passes {','.join(names)} names a pass twice", "name each pass once")
    entries: dict[str, PassSpace] = {}
    for name in names:
        cls = registry.get_pass(name)
        if not cls.comparable:
            raise OnnxoptError(f"pass {name} changes the model's inputs/outputs, so its candidates cannot be compared",
                               f"run {name} on its own with `onnxopt apply`")
        if name == BASE_PASS:
            raise OnnxoptError(f"{BASE_PASS} runs first in every candidate already", f"drop {BASE_PASS} from --passes")
        entry = (overrides or {}).get(name) or default_entry(name, objective) or PassSpace("alternatives", ({},))
        for settings in entry.resolved():
            build_config(cls.Config, settings, pass_name=name)  # unknown keys or bad values: an error now, not per candidate
        entries[name] = entry
    stray = [k for k in (overrides or {}) if k not in names]
    if stray:
        raise OnnxoptError(f"--space has settings for {stray[0]}, which is not in --passes", f"add it to --passes or drop [{stray[0]}]")
    finals = [n for n in names if registry.get_pass(n).final]
    if len(finals) > 1:
        raise OnnxoptError(f"passes {', '.join(finals)} each must run last", "search over one of them at a time")
    ordered = [n for n in names if n not in finals] + finals
    return Space(tuple(ordered), entries)
