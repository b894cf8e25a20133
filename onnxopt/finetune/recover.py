"""`onnxopt finetune`: train a compressed student's float weights against its teacher, then write the ONNX back.

The engine is torch on the CPU (the optional extra ``onnxopt[train]``;
onnxruntime-training ended at 1.19). The student graph becomes a torch module
(:mod:`onnxopt.finetune.torch_graph`) whose weights keep their initializer
names; the teacher stays an ONNX Runtime session, frozen and exact, so any
model ORT runs can teach. The loss is the fused distill graph's
(:mod:`onnxopt.finetune.loss`). Before training, the module's outputs are
checked against ORT on a probe batch, and after writing the weights back the
written graph is checked against the trained module, so the saved model is
the model that was trained. Accuracies before and after are measured on ORT.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxopt.augment import augment, parse_augment
from onnxopt.config import config_to_dict, option
from onnxopt.data import Dataset, input_specs, load_dataset
from onnxopt.errors import OnnxoptError
from onnxopt.finetune.pairing import InputPair, check_logits, pair_inputs, parse_input_map, pick_output
from onnxopt.io import load_model, same_file, save_model
from onnxopt.metrics import top1_accuracy, top1_agreement
from onnxopt.progress import Progress
from onnxopt.sessions import SessionFactory
from onnxopt.validate import collect_outputs

__all__ = ["FinetuneConfig", "FinetuneReport", "finetune", "require_torch"]

#: Samples of the training data used to check the torch module against ONNX Runtime.
PROBE_SAMPLES = 64
#: Largest |torch - ORT| accepted, relative to the output's largest magnitude (at least 1).
FIDELITY_TOLERANCE = 1e-3
TEACHER_BATCH = 256


def require_torch() -> ModuleType:
    """The torch module, or a one-line error saying how to install it."""
    try:
        import torch
    except ImportError:
        raise OnnxoptError("finetune trains with PyTorch, which is not installed",
                           "install onnxopt[train] (pip install 'onnxopt[train]')") from None
    return torch


@dataclass(frozen=True)
class FinetuneConfig:
    """Keys of `onnxopt finetune` (the loss keys mean what they mean in pass distill)."""

    epochs: int = option(10, "passes over the training data")
    lr: float = option(0.01, "peak learning rate of AdamW; it decays to 0 on a cosine")
    batch_size: int = option(64, "samples per training step")
    temperature: float = option(4.0, "temperature T of the KD loss")
    alpha: float = option(0.5, "weight of the KD loss: total = alpha*KD + (1-alpha)*CE", unit="share")
    augment: tuple[str, ...] = option((), "augmentations: flips, shift, noise, mixup (each optionally =strength)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    student_output: str = option("", "student output holding the logits (empty: its first output)")
    teacher_output: str = option("", "teacher output holding the logits (empty: its first output)")
    input_map: tuple[str, ...] = option((), "teacher inputs fed by a student input of another name, as TEACHER=STUDENT")
    seed: int = option(0, "seed of the shuffling, the augmentations and torch")
    threads: int = option(0, "torch threads while training (0: torch's default)")
    batchnorm: Literal["batch", "frozen"] = option(
        "batch", "BatchNorm while training: batch statistics (running statistics re-estimated and written back) "
                 "or the stored statistics, frozen")

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be within [0, 1], got {self.alpha}")
        if self.weight_decay < 0 or self.threads < 0:
            raise ValueError("weight_decay and threads must be >= 0")
        parse_augment(self.augment)
        parse_input_map(self.input_map)


@dataclass
class FinetuneReport:
    """What one finetune run did and measured (accuracies on ONNX Runtime)."""

    student: str
    teacher: str | None
    output: str | None
    config: dict[str, Any]
    samples: int = 0
    trainable_tensors: int = 0
    trainable_parameters: int = 0
    statistic_tensors: int = 0
    frozen_tensors: int = 0
    epochs: list[dict[str, float]] = field(default_factory=list)
    eval_source: str | None = None
    accuracy_basis: str | None = None
    accuracy: dict[str, float | None] = field(default_factory=dict)
    fidelity: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    train_seconds: float = 0.0
    written: bool = False
    notes: list[str] = field(default_factory=list)

    def drop(self, which: str) -> float | None:
        """Teacher accuracy minus the student's, ``before`` or ``after`` training (None when not measured)."""
        t, s = self.accuracy.get("teacher"), self.accuracy.get(which)
        return None if t is None or s is None else t - s

    def to_dict(self) -> dict[str, Any]:
        return {
            "student": self.student, "teacher": self.teacher, "output": self.output, "config": self.config,
            "samples": self.samples, "trainable_tensors": self.trainable_tensors,
            "trainable_parameters": self.trainable_parameters, "statistic_tensors": self.statistic_tensors,
            "frozen_tensors": self.frozen_tensors,
            "epochs": self.epochs, "eval_source": self.eval_source, "accuracy_basis": self.accuracy_basis,
            "accuracy": self.accuracy, "drop_before": self.drop("before"), "drop_after": self.drop("after"),
            "fidelity_max_abs_error": self.fidelity, "seconds": round(self.seconds, 3),
            "train_seconds": round(self.train_seconds, 3), "written": self.written, "notes": self.notes,
        }

    def lines(self) -> list[str]:
        """A short human summary."""
        out = [f"trained {self.trainable_parameters:,} parameters in {self.trainable_tensors} tensors "
               f"({self.statistic_tensors} running statistics re-estimated, {self.frozen_tensors} constants) "
               f"on {self.samples} samples in {self.train_seconds:.1f} s"]
        for e in self.epochs:
            out.append(f"  epoch {int(e['epoch'])}: loss {e['loss']:.4f} (kd {e['kd']:.4f}, ce {e['ce']:.4f}) {e['seconds']:.1f} s")
        if self.accuracy:
            pct = {k: "n/a" if v is None else f"{100 * v:.2f}%" for k, v in self.accuracy.items()}
            line = f"{self.accuracy_basis} on {self.eval_source}: " + ", ".join(f"{k} {v}" for k, v in pct.items())
            before, after = self.drop("before"), self.drop("after")
            if before is not None and after is not None:
                line += f"; drop vs teacher {100 * before:.2f} pt -> {100 * after:.2f} pt"
            out.append(line)
        out += [f"note: {n}" for n in self.notes]
        if self.written:
            out.append(f"wrote {self.output}")
        return out


def _needs_arrays(dataset: Dataset, flag: str) -> Dataset:
    if not dataset.arrays:
        raise OnnxoptError(f"{flag} {dataset.source}: finetune needs samples stacked in a .npz file",
                           "save the data with np.savez(path, <input>=array, labels=...)")
    return dataset


def _teacher_feed(pairs: list[InputPair], batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {p.teacher.name: batch[p.student.name] for p in pairs}  # type: ignore[misc]


def _probe_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Largest |difference| relative to the reference's largest magnitude (at least 1)."""
    return float(np.max(np.abs(reference - candidate)) / max(1.0, float(np.max(np.abs(reference)))))


def _scores(sessions: SessionFactory, model: ir.Model, dataset: Dataset, output: str) -> np.ndarray:
    return collect_outputs(sessions.create(model), dataset, [output])[output]


def _evaluate(report: FinetuneReport, sessions: SessionFactory, evaluation: Dataset, before: ir.Model, after: ir.Model,
              output: str, teacher: ir.Model | None, teacher_output: str | None, pairs: list[InputPair]) -> None:
    """Accuracy (or agreement with the teacher, without labels) of teacher, student before and after, on ORT."""
    report.eval_source = evaluation.source
    scores = {}
    if teacher is not None and teacher_output is not None:
        as_teacher = Dataset(evaluation.source, _teacher_feed(pairs, evaluation.arrays), [], evaluation.labels,
                             False, evaluation.batch_size)
        scores["teacher"] = _scores(sessions, teacher, as_teacher, teacher_output)
    scores["before"] = _scores(sessions, before, evaluation, output)
    scores["after"] = _scores(sessions, after, evaluation, output)
    if evaluation.labels is not None:
        report.accuracy_basis = "top-1 accuracy"
        report.accuracy = {k: top1_accuracy(v, evaluation.labels) for k, v in scores.items()}
    elif "teacher" in scores:
        report.accuracy_basis = "top-1 agreement with the teacher"
        report.accuracy = {k: top1_agreement(scores["teacher"], v) for k, v in scores.items()}
    else:
        report.notes.append(f"--eval {evaluation.source} has no labels and there is no teacher: no accuracy measured")


def finetune(
    student: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    data: str | os.PathLike[str],
    teacher: str | os.PathLike[str] | None = None,
    eval_data: str | os.PathLike[str] | None = None,
    config: FinetuneConfig | None = None,
    progress: Progress | None = None,
) -> FinetuneReport:
    """Train ``student``'s float weights on ``data`` (against ``teacher`` when given) and save to ``output``.

    The written model is the student's graph with new initializer values.
    Accuracies of teacher, student before and student after are measured on
    ``eval_data`` with ONNX Runtime. Nothing is written if a check fails.
    """
    torch = require_torch()
    from onnxopt.finetune.loss import distill_loss

    config = config or FinetuneConfig()
    progress = progress or Progress(enabled=False)
    started = time.perf_counter()
    if output is not None and same_file(student, output):
        raise OnnxoptError(f"output {output} is the student model", "write to another path; the input is never overwritten")
    report = FinetuneReport(str(student), str(teacher) if teacher else None, str(output) if output else None,
                            config_to_dict(config))
    models = _load_models(student, teacher, config)
    batches = _load_data(models, data, eval_data, config, report)
    module, statistics = _build_module(models, student, report, len(batches.train), config.batchnorm)
    sessions = SessionFactory()
    probe = {k: v[: batches.batch_size if batches.fixed_batch else PROBE_SAMPLES] for k, v in batches.train.arrays.items()}

    def torch_logits(feed: Mapping[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return module({k: torch.from_numpy(v) for k, v in feed.items()})[models.s_out].numpy()

    _check_conversion(report, sessions, models, student, probe, torch_logits)
    aug = parse_augment(config.augment)
    teacher_run, cached = _teacher_outputs(sessions, models, batches, aug.enabled)
    _train_with(torch, config, module, bool(statistics), lambda: _train(
        torch, distill_loss, module, batches.train, batches.labels, models.s_out, teacher_run, cached, aug, config,
        report, progress, batches.batch_size, drop_last=batches.fixed_batch))
    from onnxopt.finetune.torch_graph import with_weights

    trained = with_weights(models.student, module.current_weights())
    _check_written(report, sessions, trained, models.s_out, probe, torch_logits)
    if batches.evaluation is not None:
        _evaluate(report, sessions, batches.evaluation, models.student, trained, models.s_out, models.teacher,
                  models.t_out, models.pairs)
    if output is not None:
        save_model(trained, output)
        report.written = True
    report.seconds = time.perf_counter() - started
    return report


@dataclass
class _Models:
    """The student and (optional) teacher, the outputs compared, and how the teacher's inputs are fed."""

    student: ir.Model
    s_out: str
    teacher: ir.Model | None = None
    t_out: str | None = None
    pairs: list[InputPair] = field(default_factory=list)


@dataclass
class _Batches:
    """Training and evaluation data, the training labels, and the batch the student's inputs allow."""

    train: Dataset
    evaluation: Dataset | None
    labels: np.ndarray | None
    batch_size: int
    fixed_batch: bool


def _load_models(student: str | os.PathLike[str], teacher: str | os.PathLike[str] | None, config: FinetuneConfig) -> _Models:
    s_model = load_model(student)
    s_out = pick_output(s_model, config.student_output, "student")
    models = _Models(s_model, str(s_out.name))
    if teacher is not None:
        t_model = load_model(teacher)
        models.pairs = pair_inputs(s_model, t_model, parse_input_map(config.input_map))
        t_out = pick_output(t_model, config.teacher_output, "teacher")
        check_logits(s_out, t_out)
        models.teacher, models.t_out = t_model, t_out.name
    return models


def _load_data(models: _Models, data: str | os.PathLike[str], eval_data: str | os.PathLike[str] | None,
               config: FinetuneConfig, report: FinetuneReport) -> _Batches:
    specs = input_specs(models.student)
    fixed = {spec.fixed_batch for spec in specs if spec.fixed_batch is not None}
    fixed_batch = len(fixed) == 1
    batch_size = fixed.pop() if fixed_batch else config.batch_size
    if batch_size != config.batch_size:
        report.notes.append(f"the student's inputs have a fixed batch of {batch_size}: trained with it, "
                            "incomplete last batches dropped")
    train = _needs_arrays(load_dataset(data, specs, batch_size=batch_size), "--data")
    evaluation = _needs_arrays(load_dataset(eval_data, specs), "--eval") if eval_data is not None else None
    labels = None if train.labels is None else train.labels.astype(np.int64)
    if labels is None and (models.teacher is None or config.alpha < 1.0):
        raise OnnxoptError(f"--data {train.source} has no labels, which the cross-entropy term needs",
                           "add labels to the .npz, or train on the teacher alone: --teacher T.onnx --alpha 1")
    if models.teacher is None:
        report.notes.append("no teacher: trained on the labels alone (cross-entropy)")
    return _Batches(train, evaluation, labels, batch_size, fixed_batch)


def _build_module(models: _Models, student: str | os.PathLike[str], report: FinetuneReport, samples: int,
                  batchnorm: str) -> tuple[Any, list[str]]:
    """The torch module of the student, and the BatchNorm statistics it updates (``batchnorm="batch"``)."""
    from onnxopt.finetune.torch_graph import OnnxModule, statistic_initializers, trainable_initializers

    s_model = models.student
    names = trainable_initializers(s_model)
    statistics = statistic_initializers(s_model) if batchnorm == "batch" else []
    module = OnnxModule(s_model, names, statistics)  # first: an op it cannot convert is the clearer error
    if not names:
        raise OnnxoptError(f"{student} has no float32 weights in trainable positions",
                           "finetune trains Conv/Gemm/MatMul/normalisation weights held as float32 initializers")
    report.trainable_tensors = len(names)
    report.trainable_parameters = int(sum(p.numel() for p in module.parameters()))
    report.statistic_tensors = len(statistics)
    report.frozen_tensors = len(s_model.graph.initializers) - len(names) - len(statistics)
    report.samples = samples
    return module, statistics


def _check_conversion(report: FinetuneReport, sessions: SessionFactory, models: _Models, student: str | os.PathLike[str],
                      probe: Mapping[str, np.ndarray], torch_logits: Callable[[Mapping[str, np.ndarray]], np.ndarray]) -> None:
    """Training is safe only where the torch module computes what ONNX Runtime computes."""
    ort_before = sessions.create(models.student).run([models.s_out], dict(probe))[0]
    report.fidelity["torch_vs_ort_before"] = _probe_error(ort_before, torch_logits(probe))
    if report.fidelity["torch_vs_ort_before"] > FIDELITY_TOLERANCE:
        raise OnnxoptError(f"the torch conversion of {student} differs from ONNX Runtime (relative error "
                           f"{report.fidelity['torch_vs_ort_before']:.2e} on {models.s_out!r}); training it would be unsafe",
                           "report the model's ops; run `onnxopt apply --pass fold` first to simplify it")


def _teacher_outputs(sessions: SessionFactory, models: _Models, batches: _Batches, augmenting: bool
                     ) -> tuple[Callable[[Mapping[str, np.ndarray]], np.ndarray] | None, np.ndarray | None]:
    """How to run the teacher on a batch, and its outputs on all of the data when they never change."""
    if models.teacher is None:
        return None, None
    t_session = sessions.create(models.teacher)
    t_out, pairs = models.t_out, models.pairs

    def teacher_run(feed: Mapping[str, np.ndarray]) -> np.ndarray:
        return t_session.run([t_out], _teacher_feed(pairs, feed))[0]

    if augmenting or batches.fixed_batch:
        return teacher_run, None
    # without augmentation the teacher sees the same samples every epoch: run it once
    train = batches.train
    return teacher_run, np.concatenate([teacher_run({k: v[i : i + TEACHER_BATCH] for k, v in train.arrays.items()})
                                        for i in range(0, len(train), TEACHER_BATCH)])


def _train_with(torch: ModuleType, config: FinetuneConfig, module: Any, batch_statistics: bool, run: Callable[[], None]) -> None:
    """Run the training with the configured threads and batch statistics, restored afterwards whatever happens."""
    previous_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    module.mode.batch_statistics = batch_statistics
    try:
        run()
    finally:
        torch.set_num_threads(previous_threads)
        module.mode.batch_statistics = False


def _check_written(report: FinetuneReport, sessions: SessionFactory, trained: ir.Model, s_out: str,
                   probe: Mapping[str, np.ndarray], torch_logits: Callable[[Mapping[str, np.ndarray]], np.ndarray]) -> None:
    """The model to be written must compute on ONNX Runtime what the trained torch module computes."""
    ort_after = sessions.create(trained).run([s_out], dict(probe))[0]
    report.fidelity["ort_written_vs_torch_trained"] = _probe_error(torch_logits(probe), ort_after)
    if report.fidelity["ort_written_vs_torch_trained"] > FIDELITY_TOLERANCE:
        raise OnnxoptError("the written model does not compute what the trained torch module computes "
                           f"(relative error {report.fidelity['ort_written_vs_torch_trained']:.2e}); nothing was written",
                           "this is a bug in finetune; rerun with --debug and report it")


def _train(torch: ModuleType, loss_fn: Callable[..., Any], module: Any, train: Dataset, labels: np.ndarray | None,
           output_name: str, teacher_run: Callable[[Mapping[str, np.ndarray]], np.ndarray] | None,
           cached: np.ndarray | None, aug: Any, config: FinetuneConfig, report: FinetuneReport, progress: Progress,
           batch_size: int, drop_last: bool) -> None:
    """The training loop: AdamW with cosine decay, one teacher forward per augmented batch."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    n = len(train)
    steps_per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
    if steps_per_epoch == 0:
        raise OnnxoptError(f"--data holds {n} samples, fewer than the student's fixed batch of {batch_size}",
                           "give at least one full batch of training data")
    total_steps = config.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps)))
    tensor = torch.from_numpy
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        epoch_start = time.perf_counter()
        sums, seen = np.zeros(3), 0
        order = rng.permutation(n)
        with progress.task(f"finetune epoch {epoch}/{config.epochs}", total=steps_per_epoch) as task:
            for step in range(steps_per_epoch):
                index = order[step * batch_size : (step + 1) * batch_size]
                batch = augment({k: v[index] for k, v in train.arrays.items()},
                                None if labels is None else labels[index], aug, rng)
                soft = None
                if teacher_run is not None:
                    soft = tensor(cached[index] if cached is not None else teacher_run(batch.feed))
                logits = module({k: tensor(v) for k, v in batch.feed.items()})[output_name]
                terms = loss_fn(logits, soft, None if batch.labels is None else tensor(batch.labels),
                                temperature=config.temperature, alpha=config.alpha,
                                labels_mixed=None if batch.labels_mixed is None else tensor(batch.labels_mixed),
                                lam=None if batch.lam is None else tensor(batch.lam))
                optimizer.zero_grad(set_to_none=True)
                terms.total.backward()
                optimizer.step()
                schedule.step()
                sums += len(index) * np.array([terms.total.item(), terms.kd.item(), terms.ce.item()])
                seen += len(index)
                task.advance()
        loss, kd, ce = sums / seen
        report.epochs.append({"epoch": epoch, "loss": float(loss), "kd": float(kd), "ce": float(ce),
                              "seconds": time.perf_counter() - epoch_start})
    report.train_seconds = time.perf_counter() - started
