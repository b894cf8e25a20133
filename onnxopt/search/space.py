"""The search space: for each pass, the settings a search tries, as data.

Each pass declares its own (:meth:`onnxopt.Pass.search_space`): the core
names no pass. A pass's settings are either a *ladder* (ordered from light
to aggressive: a setting that breaks the budget alone ends the ladder, and any chain at
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from onnxopt.config import build_config
from onnxopt.errors import OnnxoptError
from onnxopt.pass_api import PassSpace
from onnxopt.plugins import Registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["PassSpace", "Space", "base_pass", "build_space", "default_entry", "load_space_file", "searchable_passes",
           "settings_key"]


def settings_key(settings: Mapping[str, Any]) -> str:
    """A canonical text of one pass's settings (sorted keys), used in candidate keys."""
    return json.dumps(dict(settings), sort_keys=True, separators=(",", ":"))


def default_entry(registry: Registry, name: str, objective: str = "size") -> PassSpace | None:
    """The space a pass declares for an objective (:meth:`onnxopt.Pass.search_space`), None if it declares none."""
    return registry.get_pass(name).search_space(objective)


def searchable_passes(registry: Registry, objective: str = "size") -> list[str]:
    """The default of ``--passes``: every installed pass that declares a search space, in the order they
    declare (``search_order``; ties by name), final passes last."""
    names = [n for n, cls in registry.passes.items() if cls.comparable and not cls.search_base
             and cls.search_space(objective) is not None]
    return sorted(names, key=lambda n: (registry.passes[n].final, registry.passes[n].search_order, n))


def base_pass(registry: Registry) -> str | None:
    """The lossless clean-up every candidate starts from: the installed pass that declares ``search_base``."""
    bases = sorted(n for n, cls in registry.passes.items() if cls.search_base)
    return bases[0] if bases else None


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
        budget = table.get("uses_budget")
        out[name] = PassSpace(kind, tuple(dict(s) for s in table["settings"]), dict(fixed),
                              None if budget is None else bool(budget))
    return out


def build_space(registry: Registry, passes: Sequence[str], overrides: Mapping[str, PassSpace] | None = None,
                objective: str = "size") -> Space:
    """The space for ``passes`` (defaults, replaced by ``overrides``), every setting checked against its pass's config.

    A pass with no entry is tried once with its defaults; the final pass
    (quantization) goes last whatever the order given.
    """
    names = [p.strip() for p in passes if p.strip()]
    if not names:
        raise OnnxoptError("no pass to search over", "give --passes (see `onnxopt passes`), or install a pass that "
                           "declares a search space")
    if len(set(names)) != len(names):
        raise OnnxoptError(f"--passes {','.join(names)} names a pass twice", "name each pass once")
    entries: dict[str, PassSpace] = {}
    for name in names:
        cls = registry.get_pass(name)
        if not cls.comparable:
            raise OnnxoptError(f"pass {name} changes the model's inputs/outputs, so its candidates cannot be compared",
                               f"run {name} on its own with `onnxopt apply`")
        if cls.search_base:
            raise OnnxoptError(f"{name} runs first in every candidate already", f"drop {name} from --passes")
        declared = cls.search_space(objective)
        entry = (overrides or {}).get(name) or declared or PassSpace("alternatives", ({},))
        if entry.uses_budget is None:  # a --space table that does not say: as the pass declares
            entry = replace(entry, uses_budget=bool(declared and declared.uses_budget))
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
