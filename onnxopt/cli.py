"""The `onnxopt` command: a thin click layer over :mod:`onnxopt.api`.

Every user-facing failure is one line on stderr and exit code 2 (no
traceback unless ``--debug``); a result over ``--max-drop`` exits 3.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from onnxopt.config import config_fields, load_recipe, parse_settings
from onnxopt.data import parse_shape
from onnxopt.errors import OnnxoptError
from onnxopt.progress import Progress
from onnxopt.report import format_bytes, is_html, print_report, report_paths, write_json, write_report

__all__ = ["main", "cli"]

F = TypeVar("F", bound=Callable[..., Any])
INTERNAL_ERROR_EXIT = 1
INTERRUPTED_EXIT = 130


def _terminate(signum: int, frame: Any) -> None:
    # SIGTERM unwinds like Ctrl-C so every `finally` (temp files) runs.
    raise KeyboardInterrupt


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    # Python's default shows the warning's source line too; a user gets one line, like our errors.
    click.echo(f"warning: {' '.join(str(message).split())}", err=True)


def _guarded(fn: F) -> F:
    """Turn errors into one line and an exit code; ``--debug`` shows the traceback instead."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        signal.signal(signal.SIGTERM, _terminate)
        try:
            with warnings.catch_warnings():
                if not debug:
                    warnings.showwarning = _one_line_warning
                return fn(*args, **kwargs)
        except OnnxoptError as err:
            if debug:
                raise
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: no partial output was left (an output is written whole or not at all)", err=True)
            sys.exit(INTERRUPTED_EXIT)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as err:  # a bug: still one line for a user, the traceback with --debug
            if debug:
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            click.echo(f"internal error: {type(err).__name__}: {first[:300]} (rerun with --debug for the traceback)", err=True)
            sys.exit(INTERNAL_ERROR_EXIT)

    return wrapper  # type: ignore[return-value]


def _shapes(items: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    return dict(parse_shape(s) for s in items)


def _check_folders(paths: list[Path]) -> None:
    # before the work, not after it
    for path in paths:
        if not (path.parent if str(path.parent) else Path(".")).is_dir():
            raise OnnxoptError(f"--report {path}: folder {path.parent} does not exist", "create it first or choose another path")


def _progress(quiet: bool) -> Progress:
    return Progress(enabled=not quiet and sys.stderr.isatty(), lines=not quiet and not sys.stderr.isatty())


def _timing_options(fn: F) -> F:
    """``--repeat``, ``--time-budget`` and ``--isolate``: how latency is timed (see onnxopt.timing)."""
    fn = click.option("--isolate", is_flag=True,
                      help="Time the models in a child process of their own (an ORT crash there is an error line).")(fn)
    fn = click.option("--time-budget", type=float, default=10.0, show_default=True, metavar="SECONDS",
                      help="Cap on paired latency runs; timing stops earlier once the ratio is known to ±3%.")(fn)
    fn = click.option("--repeat", type=int, default=20, show_default=True, metavar="N",
                      help="At least N blocks of paired latency runs (4 runs each), even past --time-budget.")(fn)
    return fn


def _timing(repeat: int, time_budget: float, isolate: bool, threads: int) -> Any:
    from onnxopt.timing import TimingConfig

    return TimingConfig(repeat=repeat, time_budget=time_budget, isolate=isolate, threads=threads)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show Python tracebacks instead of one-line errors.")
@click.option("--no-plugins", is_flag=True,
              help="Load no third-party plugin, only onnxopt's own passes (same as ONNXOPT_PLUGINS=none).")
@click.version_option(package_name="onnxopt", message="onnxopt %(version)s")
def cli(debug: bool, no_plugins: bool) -> None:
    """Compress ONNX models and prove on ONNX Runtime what each pass cost and won."""
    if no_plugins:
        from onnxopt.plugins import ALLOW_ENV

        os.environ[ALLOW_ENV] = "none"  # the environment, so that search's worker processes load none either


def _declared(items: tuple[str, ...]) -> dict[str, str]:
    """``--metric OUTPUT=METRIC`` values as a mapping, or a one-line error."""
    out = {}
    for item in items:
        output, sep, metric = item.partition("=")
        if not sep or not output or not metric:
            raise OnnxoptError(f"--metric {item!r} is not OUTPUT=METRIC", "e.g. --metric logits=top1 --metric boxes=cosine")
        out[output] = metric
    return out


def _apply_command(model: Path, names: list[str], settings: tuple[str, ...], recipe: Path | None, data: Path | None,
                   eval_data: Path | None, metrics: tuple[str, ...], holdout: Path | None, output: Path | None) -> str:
    """The run's command line (the options that matter to a budget), for the warning that shows how to hold one."""
    parts = ["onnxopt", "apply", str(model)]
    parts += ["--recipe", str(recipe)] if recipe is not None else ["--pass", ",".join(names)]
    for item in settings:
        parts += ["--set", item]
    for flag, value in (("--data", data), ("--eval", eval_data), ("--holdout", holdout)):
        parts += [flag, str(value)] if value is not None else []
    for item in metrics:
        parts += ["--metric", item]
    parts += ["-o", str(output)] if output is not None else []
    return shlex.join(parts)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--pass", "passes", default=None, help="Comma-separated passes in order, e.g. fold,prune,quant.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Where to write the compressed model.")
@click.option("--set", "settings", multiple=True, metavar="PASS.KEY=VALUE", help="Set a pass config key (repeatable).")
@click.option("--recipe", type=click.Path(path_type=Path), default=None, help="TOML recipe: passes and their keys.")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="Calibration data (.npz or ONNX test-data folder).")
@click.option("--eval", "eval_data", type=click.Path(path_type=Path), default=None, help="Evaluation data for validation.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=D1xD2..", help="Synthetic inputs of this shape (fidelity only).")
@click.option("--max-drop", type=float, default=None, help="Accuracy budget (0.01 = 1 pt); past it nothing is written.")
@click.option("--metric", "metrics", multiple=True, metavar="OUTPUT=METRIC",
              help="How an output's drop is measured: top1, cosine, snr, match, textmap (a text detector's probability map), detection (a YOLO-style detector's raw output), none or a plugin's metric (repeatable).")
@click.option("--holdout", type=click.Path(path_type=Path), default=None,
              help="Confirmation data: gate and report on it, choose on all of --eval (default: --eval split by --seed).")
@click.option("--force", is_flag=True, help="Write the model even when it is over --max-drop.")
@click.option("--no-rollback", is_flag=True, help="Under --max-drop, keep a pass that breaks it (the gate alone decides).")
@click.option("--report", "report_path", type=click.Path(path_type=Path), multiple=True,
              help="Write the report here: JSON, or a self-contained HTML page for a .html name (repeatable: one of each).")
@click.option("--providers", default=None, help="Execution providers for validation, e.g. dnnl (CPU is always added).")
@click.option("--threads", type=int, default=1, show_default=True, help="ORT intra-op threads for validation and latency.")
@click.option("--external-data/--no-external-data", default=None, help="Store weights in a .data file next to the output.")
@click.option("--compact", is_flag=True,
              help="Write short internal names, no intermediate shape annotations and no node metadata (lossless; ORT infers shapes).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for every random choice.")
@click.option("--no-validate", is_flag=True, help="Skip validation on ONNX Runtime.")
@click.option("--probe/--no-probe", default=None,
              help="Load and run the model on ORT once in a child process first, so an ORT crash is an error line "
                   "[default: on for models with up to 64 MiB of weights].")
@_timing_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_guarded
def apply(model: Path, passes: str | None, output: Path | None, settings: tuple[str, ...], recipe: Path | None,
          data: Path | None, eval_data: Path | None, shapes: tuple[str, ...], max_drop: float | None,
          metrics: tuple[str, ...], holdout: Path | None, force: bool, no_rollback: bool,
          report_path: tuple[Path, ...], providers: str | None, threads: int, external_data: bool | None, compact: bool,
          seed: int, no_validate: bool, probe: bool | None, repeat: int, time_budget: float, isolate: bool,
          quiet: bool) -> None:
    """Run passes on MODEL, validate against it on ONNX Runtime, and write the result to -o."""
    from onnxopt.api import GATE_EXIT_CODE, apply as run_apply

    names: list[str] = []
    merged: dict[str, dict[str, Any]] = {}
    declared: dict[str, str] = {}
    if recipe is not None:
        names, merged = load_recipe(recipe)
        table = merged.pop("metric", {})  # [metric] OUTPUT = "cosine": the drop metric per output, like --metric
        declared.update({str(k): str(v) for k, v in table.items()})
    declared.update(_declared(metrics))
    if passes:
        names = [p.strip() for p in passes.split(",") if p.strip()]
    from_recipe = set(merged)
    for pass_name, values in parse_settings(settings).items():
        merged.setdefault(pass_name, {}).update(values)
    stray = [k for k in merged if k in from_recipe and k not in names]
    if stray and names:  # the generic error would point at --set, which the user never typed
        raise OnnxoptError(f"recipe {recipe} has a [{stray[0]}] table, but {stray[0]} is not in the chain {','.join(names)}",
                           f"add {stray[0]} to --pass, or remove the [{stray[0]}] table from {recipe}")
    if max_drop is not None and not 0 <= max_drop <= 1:
        raise OnnxoptError(f"--max-drop {max_drop} is not a share between 0 and 1", "e.g. --max-drop 0.01 for 1 pt")
    with _progress(quiet) as progress:
        run = run_apply(model, names, output, settings=merged, data=data, eval_data=eval_data, shapes=_shapes(shapes),
                        max_drop=max_drop, force=force, report=list(report_path),
                        providers=providers.split(",") if providers else None, threads=threads,
                        external_data=external_data, compact=compact, seed=seed, validate_result=not no_validate,
                        progress=progress, timing=_timing(repeat, time_budget, isolate, threads),
                        metrics=declared, holdout=holdout, rollback=not no_rollback, probe=probe,
                        command=_apply_command(model, names, settings, recipe, data, eval_data, metrics, holdout, output))
    console = Console(soft_wrap=True)
    print_report(run, console)
    if output is None:
        console.print("[bold]no file written[/bold]: no -o was given (add -o out.onnx to write the result)")
    if run.gate_passed is False:
        click.echo(f"error: measured drop {run.validation.drop:.4f} is over --max-drop {max_drop}"  # type: ignore[union-attr]
                   + ("" if force else "; nothing written (use --force to write anyway)"), err=True)
        sys.exit(GATE_EXIT_CODE)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--shape", "shapes", multiple=True, metavar="NAME=D1xD2..", help="Input shape for MACs (free dims otherwise: batch 1, others 224).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@_guarded
def inspect(model: Path, shapes: tuple[str, ...], as_json: bool) -> None:
    """Describe MODEL: opsets, inputs/outputs, ops, parameters, MACs, where weights live."""
    from onnxopt.inspection import inspect_model

    info = inspect_model(model, _shapes(shapes))
    if as_json:
        click.echo(json.dumps(info.to_dict(), indent=2))
        return
    console = Console(soft_wrap=True)
    console.print(f"[bold]{escape(info.path)}[/bold]  {format_bytes(info.size_bytes)}  IR {info.ir_version}  "
                  f"opsets {', '.join(f'{k} {v}' for k, v in info.opsets.items())}  producer {info.producer}")
    for line in info.inputs:
        console.print(f"  input  {escape(line)}")
    for line in info.outputs:
        console.print(f"  output {escape(line)}")
    w = info.weights
    console.print(f"parameters {info.parameters:,}")
    console.print(f"weights: {w.initializers} initializers ({format_bytes(w.initializer_bytes)}), "
                  f"{w.external} external ({format_bytes(w.external_bytes)}), "
                  f"{w.constant_nodes} in Constant nodes ({format_bytes(w.constant_bytes)}), "
                  f"{w.constant_of_shape_nodes} ConstantOfShape ({w.constant_of_shape_elements:,} elements)")
    shape_note = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in info.macs.input_shapes.items())
    extra = " (free dims assumed; give --shape)" if info.macs.assumed else ""
    unknown = f", {len(info.macs.unknown)} layer(s) with unknown shapes" if info.macs.unknown else ""
    console.print(f"MACs {info.macs.total:,} at {shape_note}{extra}{unknown}  "
                  + "  ".join(f"{k} {v:,}" for k, v in info.macs.by_op.items()))
    table = Table(title=f"ops ({info.nodes} nodes)", title_justify="left")
    table.add_column("op")
    table.add_column("count", justify="right")
    for op, n in info.ops.items():
        table.add_row(op, str(n))
    console.print(table)
    for note in info.notes:
        console.print(f"[dim]{escape(note)}[/dim]")


@cli.command()
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--eval", "eval_data", type=click.Path(path_type=Path), default=None, help="Evaluation data.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=D1xD2..", help="Synthetic inputs of this shape.")
@click.option("--providers", default=None, help="Execution providers, e.g. xnnpack (CPU is always added).")
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--max-drop", type=float, default=None, help="Exit 3 when the drop is over this budget.")
@click.option("--metric", "metrics", multiple=True, metavar="OUTPUT=METRIC",
              help="How an output's drop is measured: top1, cosine, snr, match, textmap (a text detector's probability map), detection (a YOLO-style detector's raw output), none or a plugin's metric (repeatable).")
@click.option("--report", "report_path", type=click.Path(path_type=Path), multiple=True,
              help="Write the report here: JSON, or an HTML page for a .html name (repeatable).")
@click.option("--target", type=click.Choice(["host", "arm64"]), default="host", show_default=True,
              help="arm64: also run both models on the aarch64 onnxruntime under emulation (scripts/setup_arm64.sh).")
@click.option("--probe/--no-probe", default=None,
              help="Load and run each model on ORT once in a child process first, so an ORT crash is an error line "
                   "[default: on for models with up to 64 MiB of weights].")
@_timing_options
@click.option("-q", "--quiet", is_flag=True)
@_guarded
def validate(reference: Path, candidate: Path, eval_data: Path | None, shapes: tuple[str, ...], providers: str | None,
             threads: int, max_drop: float | None, metrics: tuple[str, ...], report_path: tuple[Path, ...], target: str,
             probe: bool | None, repeat: int, time_budget: float, isolate: bool, quiet: bool) -> None:
    """Compare CANDIDATE with REFERENCE on ONNX Runtime: metrics, drop, size, latency."""
    from onnxopt.api import GATE_EXIT_CODE, validate_models
    from onnxopt.io import refuse_overwriting
    from onnxopt.report import RunReport

    reports = report_paths(report_path)
    refuse_overwriting([("the reference model", reference), ("the candidate model", candidate), ("the --eval file", eval_data)],
                       [("report", r) for r in reports])
    _check_folders(reports)
    arm = None
    if target == "arm64":  # --providers then name the aarch64 build's providers; x86 runs on CPU as the baseline
        from onnxopt.arm import find_runtime, format_comparison, validate_on_arm64

        find_runtime()
    with _progress(quiet) as progress:
        result = validate_models(reference, candidate, eval_data=eval_data, shapes=_shapes(shapes),
                                 providers=providers.split(",") if providers and target == "host" else None,
                                 threads=threads, progress=progress, timing=_timing(repeat, time_budget, isolate, threads),
                                 metrics=_declared(metrics), probe=probe)
    if target == "arm64":
        arm = validate_on_arm64(reference, candidate, eval_data=eval_data, shapes=_shapes(shapes),
                                providers=providers.split(",") if providers else None, threads=threads,
                                metrics=_declared(metrics))
    run = RunReport(input=str(reference), output=None, validation=result, max_drop=max_drop,
                    gate_passed=None if max_drop is None else result.drop <= max_drop and (arm is None or arm.drop <= max_drop))
    console = Console(soft_wrap=True)
    print_report(run, console)
    if arm is not None:
        for line in format_comparison(arm):
            console.print(escape(line))
    for path in reports:
        write_report({**run.to_dict(), "candidate": str(candidate), **({"target": arm.to_dict()} if arm is not None else {})},
                     path)
    if run.gate_passed is False:
        sys.exit(GATE_EXIT_CODE)


@cli.command("passes")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_guarded
def list_passes(as_json: bool) -> None:
    """List every registered pass: name, summary, distribution, config keys."""
    from importlib.metadata import PackageNotFoundError, version

    from onnxopt.plugins import load_registry

    try:
        version("onnxopt")
    except PackageNotFoundError:
        raise OnnxoptError("onnxopt's install metadata is missing, so no pass entry points can be found",
                           "install it: pip install -e .") from None
    registry = load_registry()
    entries = []
    for name, cls in sorted(registry.passes.items()):
        origin = registry.origins[f"pass:{name}"]
        entries.append({
            "name": name, "summary": cls.summary(), "plugin": origin.plugin, "distribution": origin.distribution,
            "lossless": cls.lossless, "final": cls.final, "requires": sorted(cls.requires),
            "config": [{"key": f.name, "type": f.type_name, "default": f.default if not isinstance(f.default, tuple) else list(f.default),
                        "doc": f.doc, "unit": f.unit} for f in config_fields(cls.Config)],
        })
    if as_json:
        click.echo(json.dumps(entries, indent=2, default=str))
        return
    for e in entries:
        flags = [x for x in ("lossless" if e["lossless"] else "", "runs last" if e["final"] else "",
                             f"needs {', '.join(e['requires'])}" if e["requires"] else "") if x]
        click.echo(f"{e['name']}  {e['summary']}  [{e['distribution']}]" + (f"  ({'; '.join(flags)})" if flags else ""))
        for f in e["config"]:
            unit = f" [{f['unit']}]" if f["unit"] else ""
            click.echo(f"    {e['name']}.{f['key']}: {f['type']} = {f['default']!r}{unit}  {f['doc']}")


@cli.command("search")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--eval", "eval_data", type=click.Path(path_type=Path), required=True, help="Evaluation data the budget is measured on.")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="Calibration data for the passes that need it.")
@click.option("--max-drop", type=float, default=0.01, show_default=True, help="Accuracy budget (0.01 = 1 pt).")
@click.option("--metric", "metrics", multiple=True, metavar="OUTPUT=METRIC",
              help="How an output's drop is measured: top1, cosine, snr, match, textmap (a text detector's probability map), detection (a YOLO-style detector's raw output), none or a plugin's metric (repeatable).")
@click.option("--passes", default=None, help="Passes to search over, e.g. prune,quant [default: every installed pass that declares a search space].")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Write the best model within budget here.")
@click.option("--report", "report_paths_given", type=click.Path(path_type=Path), multiple=True,
              help="JSON of every candidate, written after each one; rerunning with it resumes. "
                   "A .html name (alone or besides the JSON) gets a page with the Pareto fronts at the end.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="Pareto plot (PNG; needs onnxopt[plot]).")
@click.option("--objective", type=click.Choice(["size", "latency"]), default="size", show_default=True,
              help="Best = smallest file (then fastest), or fastest (then smallest).")
@click.option("--workers", type=int, default=2, show_default=True, help="Candidates evaluated at once (1: in this process).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local process pool, or Ray (RAY_ADDRESS, else a local Ray instance; needs onnxopt[ray]).")
@click.option("--max-candidates", type=int, default=40, show_default=True, help="Most candidates to evaluate.")
@click.option("--space", type=click.Path(path_type=Path), default=None, help="TOML file replacing the settings tried per pass.")
@click.option("--threads", type=int, default=1, show_default=True, help="ORT intra-op threads for latency.")
@click.option("--latency-batch", type=int, default=1, show_default=True, help="Samples per run when timing latency.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--keep-models", is_flag=True, help="Keep every candidate's model in <report>.models/.")
@click.option("--restart", is_flag=True, help="Ignore (and overwrite) an existing --report instead of resuming it.")
@click.option("--force", is_flag=True,
              help="Write the pick even when it is over --max-drop on the confirmation part (exit 3 all the same).")
@click.option("--pick", type=int, default=None, metavar="ID",
              help="Write candidate ID of the --report JSON to -o (rebuilt from its recipe) instead of searching.")
@_timing_options
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_guarded
def search_command(model: Path, eval_data: Path, data: Path | None, max_drop: float, metrics: tuple[str, ...],
                   passes: str | None, output: Path | None,
                   report_paths_given: tuple[Path, ...], plot_path: Path | None, objective: str, workers: int, executor: str,
                   max_candidates: int, space: Path | None, threads: int, latency_batch: int, seed: int,
                   keep_models: bool, restart: bool, force: bool, pick: int | None, repeat: int, time_budget: float,
                   isolate: bool, quiet: bool) -> None:
    """Find the smallest (or fastest) model within --max-drop: search pass settings, keep the Pareto fronts."""
    from onnxopt.api import GATE_EXIT_CODE
    from onnxopt.search.driver import search, write_candidate
    from onnxopt.search.report import print_search

    reports = report_paths(report_paths_given)
    report_path = next((r for r in reports if not is_html(r)), None)  # the resumable state
    html_paths = [r for r in reports if is_html(r)]
    if html_paths:
        from onnxopt.io import refuse_overwriting

        refuse_overwriting([("the input model", model), ("the --eval file", eval_data), ("the --data file", data)],
                           [("report", r) for r in html_paths])
        _check_folders(html_paths)
    if pick is not None:
        if report_path is None or output is None:
            raise OnnxoptError("--pick needs the search's --report and an -o to write to", "e.g. --report s.json --pick 12 -o m.onnx")
        chosen = write_candidate(report_path, pick, output)
        click.echo(f"wrote {output}: #{pick} {chosen.get('label', '')} (drop {chosen['drop'] * 100:.2f} pt)")
        return

    try:
        with _progress(quiet) as progress:
            result = search(model, eval_data=eval_data, data=data, max_drop=max_drop, passes=passes, output=output,
                            report=report_path, plot=plot_path, objective=objective, workers=workers, executor=executor,
                            max_candidates=max_candidates, space=space, seed=seed, threads=threads,
                            latency_batch=latency_batch, keep_models=keep_models, restart=restart, progress=progress,
                            timing=_timing(repeat, time_budget, isolate, threads), metrics=_declared(metrics),
                            force=force)
    except KeyboardInterrupt:
        where = f"finished candidates are in {report_path}; rerun the same command to resume" if report_path else \
            "nothing kept (give --report to make a search resumable)"
        click.echo(f"interrupted: {where}", err=True)
        sys.exit(INTERRUPTED_EXIT)
    print_search(result, Console(soft_wrap=True, highlight=False))
    for path in html_paths:
        write_report(result.state.to_dict(), path)
    if result.best is None or not result.best.get("within_budget_confirmation", True):
        sys.exit(GATE_EXIT_CODE)  # nothing within, or the pick over budget on the confirmation part (the gate)


@cli.command()
@click.argument("student", type=click.Path(path_type=Path))
@click.option("--teacher", type=click.Path(path_type=Path), default=None, help="Teacher model (ONNX); without it, labels alone.")
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Training data (.npz keyed by input names + labels).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the trained student.")
@click.option("--eval", "eval_data", type=click.Path(path_type=Path), default=None, help="Evaluation data: accuracy before/after.")
@click.option("--epochs", type=int, default=None, help="Passes over the data [10].")
@click.option("--lr", type=float, default=None, help="Peak learning rate of AdamW, cosine decay [0.01].")
@click.option("--batch-size", type=int, default=None, help="Samples per step [64].")
@click.option("--temperature", type=float, default=None, help="KD temperature T [4].")
@click.option("--alpha", type=float, default=None, help="total = alpha*KD + (1-alpha)*CE [0.5].")
@click.option("--augment", default=None, metavar="LIST", help="Augmentations, e.g. flips,shift=2,noise=0.05,mixup=0.2.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Any other finetune key, e.g. batchnorm=frozen.")
@click.option("--seed", type=int, default=None, help="Seed of shuffling, augmentation and torch [0].")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None, help="Write the JSON report here.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_guarded
def finetune(student: Path, teacher: Path | None, data: Path, output: Path, eval_data: Path | None, epochs: int | None,
             lr: float | None, batch_size: int | None, temperature: float | None, alpha: float | None, augment: str | None,
             settings: tuple[str, ...], seed: int | None, report_path: Path | None, quiet: bool) -> None:
    """Train STUDENT's weights against --teacher on --data (recovers a compressed model's accuracy); write -o."""
    from onnxopt.config import build_config
    from onnxopt.finetune import FinetuneConfig, finetune as run_finetune

    values: dict[str, Any] = dict(item.partition("=")[::2] for item in settings)
    given = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "temperature": temperature, "alpha": alpha,
             "augment": augment, "seed": seed}
    values.update({k: v for k, v in given.items() if v is not None})
    config = build_config(FinetuneConfig, values, pass_name="finetune")
    with _progress(quiet) as progress:
        result = run_finetune(student, output, data=data, teacher=teacher, eval_data=eval_data, config=config, progress=progress)
    for line in result.lines():
        click.echo(line)
    if report_path is not None:
        write_json(result.to_dict(), report_path)


def main() -> None:
    """Entry point of the `onnxopt` console script."""
    cli(prog_name="onnxopt")


if __name__ == "__main__":
    main()
