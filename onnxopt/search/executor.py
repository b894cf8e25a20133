"""Where candidates are evaluated: in this process, in a local process pool, or on Ray.

Every executor takes recipes (JSON form) with a key, runs them on
:class:`~onnxopt.search.evaluate.Evaluator` instances that each load the
model and data once, and hands back results as they finish. No scheduling
of our own beyond that: concurrent.futures and Ray do the distribution.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Protocol

from onnxopt.errors import OnnxoptError
from onnxopt.search.evaluate import (
    Evaluator,
    WorkerSetup,
    evaluate_in_worker,
    init_worker,
)
from onnxopt.search.recipe import recipe_from_json

__all__ = ["Executor", "InlineExecutor", "LocalExecutor", "RayExecutor", "make_executor", "EXECUTORS"]

EXECUTORS = ("local", "ray")


class Executor(Protocol):
    """Runs candidate evaluations; at most ``capacity`` at once."""

    capacity: int

    def submit(self, key: str, recipe: list[dict[str, Any]]) -> None: ...

    def pending(self) -> int: ...

    def next_result(self) -> tuple[str, dict[str, Any]]:
        """Block until one submitted candidate is done; its key and result."""
        ...

    def close(self) -> None: ...


class InlineExecutor:
    """One candidate at a time in this process (``--workers 1``): no start-up cost, easiest to debug."""

    capacity = 1

    def __init__(self, setup: WorkerSetup, evaluator: Evaluator | None = None) -> None:
        self._setup = setup
        self._evaluator = evaluator
        self._queue: deque[tuple[str, list[dict[str, Any]]]] = deque()

    def submit(self, key: str, recipe: list[dict[str, Any]]) -> None:
        self._queue.append((key, recipe))

    def pending(self) -> int:
        return len(self._queue)

    def next_result(self) -> tuple[str, dict[str, Any]]:
        if self._evaluator is None:
            self._evaluator = Evaluator(self._setup)
        key, recipe = self._queue.popleft()
        return key, self._evaluator.evaluate(recipe_from_json(recipe))

    def close(self) -> None:
        self._queue.clear()


class LocalExecutor:
    """A pool of worker processes on this machine (spawned: ORT thread pools do not survive a fork)."""

    def __init__(self, setup: WorkerSetup, workers: int) -> None:
        self.capacity = workers
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=init_worker, initargs=(setup,))
        self._futures: dict[Future[dict[str, Any]], str] = {}

    def submit(self, key: str, recipe: list[dict[str, Any]]) -> None:
        self._futures[self._pool.submit(evaluate_in_worker, recipe)] = key

    def pending(self) -> int:
        return len(self._futures)

    def next_result(self) -> tuple[str, dict[str, Any]]:
        done, _ = wait(list(self._futures), return_when=FIRST_COMPLETED)
        future = next(iter(done))
        key = self._futures.pop(future)
        try:
            return key, future.result()
        except Exception as err:
            # a worker died (out of memory, a crash in native code, a failed start): not the candidate's fault, so
            # nothing is recorded for it and a rerun retries it
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise OnnxoptError(f"a search worker process failed: {first[:200]}",
                               "rerun with --workers 1 --debug to see why; rerunning with the same --report resumes") from None

    def close(self) -> None:
        # on an interrupt, running evaluations are abandoned: their results were not recorded, a rerun redoes them
        processes = list(getattr(self._pool, "_processes", {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=5)
        self._futures.clear()


class RayExecutor:
    """Ray actors, one per worker, each holding an evaluator (``--executor ray``).

    Connects to the cluster named by ``RAY_ADDRESS`` when set, else starts a
    local Ray instance. The model and data paths must be readable on every
    node (a shared folder), and so must the cache folder for prefix reuse
    across nodes (without it, each actor reuses its own prefixes only).
    """

    def __init__(self, setup: WorkerSetup, workers: int) -> None:
        try:
            import ray
            from ray.util import ActorPool
        except ImportError:
            raise OnnxoptError("--executor ray needs Ray, which is not installed",
                               "pip install 'onnxopt[ray]' (or use the default --executor local)") from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            import os

            if os.environ.get("RAY_ADDRESS"):
                ray.init(include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
                self._started = True
        actor = ray.remote(num_cpus=1)(_RayEvaluator)
        self.capacity = workers
        self._pool = ActorPool([actor.remote(setup) for _ in range(workers)])
        self._pending = 0

    def submit(self, key: str, recipe: list[dict[str, Any]]) -> None:
        self._pool.submit(lambda actor, item: actor.evaluate.remote(item), (key, recipe))
        self._pending += 1

    def pending(self) -> int:
        return self._pending

    def next_result(self) -> tuple[str, dict[str, Any]]:
        try:
            key, result = self._pool.get_next_unordered()
            self._pending -= 1
        except Exception as err:  # an actor died
            raise OnnxoptError(f"a Ray worker failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}",
                               "check the Ray logs; rerun the same command to resume") from None
        return key, result

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()


class _RayEvaluator:
    """The Ray actor: one evaluator, loaded once."""

    def __init__(self, setup: WorkerSetup) -> None:
        self._evaluator = Evaluator(setup)

    def evaluate(self, item: tuple[str, list[dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
        key, recipe = item
        return key, self._evaluator.evaluate(recipe_from_json(recipe))


def make_executor(kind: str, setup: WorkerSetup, workers: int, *, local: Evaluator | None = None) -> Executor:
    """The executor for ``--executor`` and ``--workers`` (1 local worker runs in this process, on ``local``)."""
    if kind == "ray":
        return RayExecutor(setup, max(1, workers))
    if kind != "local":
        raise OnnxoptError(f"--executor {kind} is not one of {', '.join(EXECUTORS)}", "use local or ray")
    if workers <= 1:
        return InlineExecutor(setup, local)
    return LocalExecutor(setup, workers)
