"""A tiny plugin installed for one subprocess: entry points from a temporary dist-info on PYTHONPATH.

``importlib.metadata`` finds ``*.dist-info/entry_points.txt`` in any folder on
``sys.path``, so a subprocess sees the probe exactly as it would see a
plugin installed with pip: it is loaded by onnxopt's real entry-point
discovery, and reported under its own distribution name. What the probe does
(pause at a point and say so, raise in a hook) is set by environment
variables; see ``onnxopt_probe``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DISTRIBUTION", "PLUGIN_NAME", "VERSION", "probe_env"]

PLUGIN_DIR = Path(__file__).resolve().parent
DISTRIBUTION = "onnxopt-probe"
PLUGIN_NAME = "probe"
VERSION = "0.3.1"


def probe_env(root: Path, *, marker: Path | None = None, pause: str | None = None, fail: str | None = None) -> dict[str, str]:
    """Environment for a subprocess that has the probe plugin installed.

    ``marker``: file the probe appends to at each point it reaches (the test waits for it);
    ``pause``: ``pass`` | ``save`` | ``commit`` -- where it stops and waits to be interrupted;
    ``fail``: ``import`` | ``register`` | ``metrics`` | ``before`` | ``after`` -- the hook that raises.
    """
    site = root / "probe-site"
    info = site / f"{DISTRIBUTION.replace('-', '_')}-{VERSION}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DISTRIBUTION}\nVersion: {VERSION}\n")
    (info / "entry_points.txt").write_text(f"[onnxopt]\n{PLUGIN_NAME} = onnxopt_probe\n")
    env = {
        "PYTHONPATH": os.pathsep.join([str(site), str(PLUGIN_DIR), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "ONNXOPT_PROBE_MARKER": str(marker or ""),
        "ONNXOPT_PROBE_PAUSE": pause or "",
        "ONNXOPT_PROBE_FAIL": fail or "",
    }
    return env
