"""`onnxopt search`: find the smallest, fastest model within an accuracy budget.

Explores pass settings (space), evaluates candidates on ONNX Runtime in
worker processes or on Ray (executor, evaluate), keeps the Pareto fronts of
accuracy against latency and size (pareto), resumes from its JSON (state),
and draws the fronts (plot). Candidates are rebuilt from their recipes
(recipe); the order in which they are tried is the strategy's (strategy).
"""

from __future__ import annotations

from onnxopt.search.driver import SearchResult, search
from onnxopt.search.pareto import pareto_front
from onnxopt.search.recipe import Step, apply_recipe, recipe_from_json

__all__ = ["search", "SearchResult", "pareto_front", "Step", "apply_recipe", "recipe_from_json"]
