"""Recovering a compressed student's accuracy by training it against a teacher (`onnxopt finetune`).

Torch runs the training (the optional extra ``onnxopt[train]``); it is
imported only when training starts, so the rest of onnxopt works without it.
"""

from __future__ import annotations

from onnxopt.finetune.recover import FinetuneConfig, FinetuneReport, finetune

__all__ = ["FinetuneConfig", "FinetuneReport", "finetune"]
