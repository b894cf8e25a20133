"""Per-layer settings: ``GLOB=K`` or ``GLOB=K/tensor|channel`` entries that give chosen weights their own k.

An entry's glob is matched, like ``exclude``, against the weight's name and
the names of the nodes that read it; the first entry that matches wins, and
weights no entry matches take the config's ``k`` and ``granularity``. The
budget's per-layer refinement (:mod:`.allocation`) writes its choices in the
same form, one exact (escaped) weight name per entry, after the user's own.
"""

from __future__ import annotations

import fnmatch
import glob as globbing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["LayerSetting", "parse_layers", "setting_for", "exact_entry"]

Granularity = Literal["tensor", "channel"]


@dataclass(frozen=True)
class LayerSetting:
    """One entry: the glob, its k, and its granularity (None: the config's)."""

    entry: str
    glob: str
    k: int
    granularity: Granularity | None

    def matches(self, *names: str | None) -> bool:
        return any(name and fnmatch.fnmatchcase(name, self.glob) for name in names)


def parse_layers(entries: Sequence[str]) -> tuple[LayerSetting, ...]:
    """The entries parsed; a malformed one is a ValueError naming it (the config turns it into a one-line error)."""
    out = []
    for entry in entries:
        # the last '=' splits: a weight name may hold one, a setting never does
        glob, sep, setting = entry.rpartition("=")
        k_text, _, granularity = setting.partition("/")
        if not sep or not glob or not k_text.strip().isdigit():
            raise ValueError(f"layers entry {entry!r} is not GLOB=K or GLOB=K/tensor|channel (e.g. fc*=256)")
        k = int(k_text)
        if not 2 <= k <= 256:
            raise ValueError(f"layers entry {entry!r}: k {k} is not in 2..256")
        if granularity not in ("", "tensor", "channel"):
            raise ValueError(f"layers entry {entry!r}: granularity {granularity!r} is not tensor or channel")
        out.append(LayerSetting(entry, glob, k, granularity or None))  # type: ignore[arg-type]
    return tuple(out)


def setting_for(settings: Sequence[LayerSetting], weight: str, readers: Sequence[str]) -> LayerSetting | None:
    """The first entry matching the weight's name or one of its readers' names (None: the config's k applies)."""
    return next((s for s in settings if s.matches(weight, *readers)), None)


def exact_entry(weight: str, k: int, granularity: Granularity) -> str:
    """An entry that matches exactly the weight named ``weight`` (glob characters in the name escaped)."""
    return f"{globbing.escape(weight)}={k}/{granularity}"
