"""The `unetflow` command: one subcommand per workflow stage, the only command line.

Snakemake rules call these with paths and the JSON of exactly the config section a stage
depends on; users can call them by hand the same way. A section given as --settings is
validated against the config schema and its defaults filled (config.section_settings), so a
stage run by hand runs what the workflow runs. --execution carries the settings of how a
stage runs (threads, device, workers: config.EXECUTION_KEYS), which rules pass apart from
--settings so that editing them reruns nothing.

Errors a user can fix (a missing file, invalid JSON, a bad setting, no GPU where one is
required) are one line, `unetflow <stage>: error: ...`, naming the file or key, with exit
status 1 (2 for a malformed command line); anything else is a bug and keeps its traceback.
So are failures of the environment: a full disk, a quota, a read-only or unwritable folder
(naming the path written, unetflow.files.WriteFailed) and an allocation that does not fit
(MemoryError, torch's allocators). The `unetflow` command runs the stage in a forked child
(unetflow.supervisor), so that a kill by the kernel's out-of-memory killer, which no
process can catch, still leaves a line in the job's log.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from unetflow import notices
from unetflow.config import section_settings
from unetflow.errors import DeviceUnavailable

__all__ = ["main", "build_parser", "written_paths"]

# what a user can fix, reported in one line (see the module docstring)
USER_ERRORS = (ValueError, OSError, FloatingPointError, DeviceUnavailable)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line: `<prog>: error: <what>`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text[:60]!r}") from err


def _input(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    """An argument naming a file or folder that must exist (checked before the stage runs)."""
    action = parser.add_argument(flag, **kwargs)
    name = action.option_strings[0] if action.option_strings else action.dest
    parser.set_defaults(inputs=[*(parser.get_default("inputs") or []), (action.dest, name)])


def _paths_in(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _dataset_paths(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(where, path) of the files named inside a --datasets JSON list."""
    found = []
    for i, entry in enumerate(getattr(args, "datasets", None) or []):
        if not isinstance(entry, dict):
            raise ValueError(f"--datasets[{i}]: {entry!r} is not a mapping of keys")
        for key in ("image", "target", "stats", "positions"):
            if entry.get(key):
                found.append((f"--datasets[{i}].{key}", str(entry[key])))
    return found


def check_inputs(args: argparse.Namespace) -> None:
    """Every input path given exists; the error names the argument and the path."""
    named = [(name, path) for dest, name in getattr(args, "inputs", None) or []
             for path in _paths_in(getattr(args, dest))]
    for where, path in [*named, *_dataset_paths(args)]:
        if not Path(path).exists():
            raise FileNotFoundError(f"{where}: {path}: no such file or directory; fix the path")


def _section(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """--settings (and --execution) as a validated section with the schema's defaults."""
    return section_settings(section, {**args.settings, **(getattr(args, "execution", None)
                                                          or {})})


def _cmd_demo_data(args: argparse.Namespace) -> None:
    from unetflow.demo_store import write_demo_data

    for name, path in write_demo_data(args.output_dir, _section(args, "demo")).items():
        print(f"demo_data: {name} -> {path}")


def _print_channels(dataset: str, where: str, channels: list[dict[str, Any]]) -> None:
    for ch in channels:
        print(f"normalize: {dataset}{where} channel {ch['name']}: mean {ch['mean']:.4g} "
              f"std {ch['std']:.4g} min {ch['min']:.4g} max {ch['max']:.4g} "
              f"percentiles {ch['percentiles']}")


def _warn_constant(dataset: str, source: str, channels: list[dict[str, Any]]) -> None:
    for ch in channels:
        if ch["max"] == ch["min"]:
            notices.warn(f"dataset '{dataset}' channel {ch['name']} of {source} is constant "
                         f"({ch['min']:.4g}); it normalizes to 0 everywhere, so a model "
                         f"learns nothing from it and its scores say nothing: check the image")


def _warn_sampled(dataset: str, used: dict[str, Any]) -> None:
    if used["used"] < used["total"]:
        notices.warn(f"dataset '{dataset}': normalization statistics come from {used['used']} "
                     f"of {used['total']} positions (normalize.sample_positions); set it to "
                     f"null to read every position")


def _normalize_positions(args: argparse.Namespace) -> dict[str, Any]:
    from unetflow.normalize import compute_positions_stats
    from unetflow.plates import read_positions

    positions = read_positions(args.positions)
    if positions.dataset != args.dataset:
        raise ValueError(f"--positions {args.positions} holds dataset '{positions.dataset}', "
                         f"not --dataset {args.dataset}")
    per = args.per or positions.normalize
    stats = compute_positions_stats(positions, args.channels, _section(args, "normalize"), per)
    if per == "position":
        print(f"normalize: {args.dataset}: statistics of {len(stats['positions'])} positions")
        for key, own in stats["positions"].items():
            _warn_constant(args.dataset, f"position {key} ({own['image']})", own["channels"])
        return stats
    used = stats["positions"]
    _print_channels(args.dataset, f" ({used['used']} of {used['total']} positions)",
                    stats["channels"])
    _warn_constant(args.dataset, positions.source, stats["channels"])
    _warn_sampled(args.dataset, used)
    return stats


def _cmd_normalize(args: argparse.Namespace) -> None:
    from unetflow.normalize import compute_dataset_stats, write_stats

    if args.positions:
        if args.target:
            raise ValueError("--target goes with --image; the positions file names each "
                             "position's target")
        write_stats(_normalize_positions(args), args.output)
        return
    if args.per:
        raise ValueError("--per chooses statistics per dataset or per position of a "
                         "--positions file; a single --image has one set")
    stats = compute_dataset_stats(args.image, args.channels, _section(args, "normalize"),
                                  args.dataset,
                                  target_path=args.target)
    _print_channels(args.dataset, "", stats["channels"])
    _warn_constant(args.dataset, args.image, stats["channels"])
    write_stats(stats, args.output)


def _cmd_extract_patches(args: argparse.Namespace) -> None:
    from unetflow.patches import DatasetInput, extract_patches, summarize_records

    datasets = [DatasetInput(**d) for d in args.datasets]
    norm = section_settings("normalize", args.normalize)
    records = extract_patches(datasets, args.task, _section(args, "patches"),
                              {"method": norm["method"], "clip": norm["clip"]},
                              args.num_classes, args.ignore_label, args.store, args.manifest,
                              target=args.segmentation_target)
    for line in summarize_records(records):
        print(f"extract_patches: {line}")


def _cmd_train(args: argparse.Namespace) -> None:
    from unetflow.train import Preempted, train_model

    settings = _section(args, "train")
    model_settings = section_settings("model", args.model_settings)
    if settings["gpus"] > 1 and "WORLD_SIZE" not in os.environ:
        from unetflow.distributed import launch_command

        command = launch_command(sys.argv[1:], settings["gpus"])
        sys.stdout.flush()
        os.execv(command[0], command)  # torchrun takes this process: signals reach it
    try:
        train_model(args.store, args.model_dir, args.task, model_settings, settings,
                    args.best, args.last, args.log, args.curve, threads=args.threads)
    except Preempted as stop:
        print(f"train: {stop}", file=sys.stderr, flush=True)
        if "WORLD_SIZE" in os.environ:  # a rank: rank 0 has saved; end without teardown
            sys.stdout.flush()
            os._exit(143)
        sys.exit(143)


def _prediction_job(args: argparse.Namespace):
    from unetflow.predict import prepare_job

    return prepare_job(args.checkpoint, args.image, args.channels, _section(args, "predict"),
                       getattr(args, "stats", None), task=args.task)


def _cmd_predict_create(args: argparse.Namespace) -> None:
    from unetflow.predict import create_raw_store

    job = _prediction_job(args)
    create_raw_store(job, args.output, job.settings["shards"])
    print(f"predict create: {job.plan.tile_count()} tiles of {list(job.plan.tile)} "
          f"(halo {job.plan.halo}, {job.plan.blending}) in {job.settings['shards']} shard(s)"
          f" -> {args.output}")


def _cmd_predict_shard(args: argparse.Namespace) -> None:
    from unetflow.files import write_json_atomic
    from unetflow.predict import predict_shard

    job = _prediction_job(args)
    shards = job.settings["shards"]
    if not 0 <= args.shard < shards:
        raise ValueError(f"--shard {args.shard} is not one of 0..{shards - 1} "
                         f"(predict.shards: {shards})")
    record = predict_shard(job, args.raw, args.shard, shards, args.threads)
    write_json_atomic(record, args.output)  # appears only when its tiles are all written
    print(f"predict shard {args.shard + 1}/{shards}: {record['tiles']} tiles in "
          f"{record['seconds']} s ({record['megapixels_per_s']} Mpx/s on {record['device']})")


def _job_record(path: str, what: str) -> dict[str, Any]:
    """The JSON record a shard or batch job wrote; a damaged one names the job to rerun."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a {what} record ({err}); rerun that {what}") from err


def _cmd_predict_gather(args: argparse.Namespace) -> None:
    from unetflow.predict import gather_prediction

    records = [_job_record(p, "shard") for p in args.records]
    job = _prediction_job(args)
    summary = gather_prediction(job, args.raw, records, args.output, args.model, args.dataset,
                                args.threads)
    print(f"predict gather: {summary}")


def _cmd_predict_run(args: argparse.Namespace) -> None:
    from unetflow.predict import predict_to_ome_zarr

    predict_to_ome_zarr(args.checkpoint, args.image, args.stats, args.channels,
                        _section(args, "predict"), args.output, args.model, args.dataset,
                        threads=args.threads, task=args.task)
    print(f"predict: {args.model} on {args.dataset} -> {args.output}")


def _position_keys(keys: Any) -> list[str] | None:
    if keys is not None and (not isinstance(keys, list)
                             or not all(isinstance(k, str) for k in keys)):
        raise ValueError(f"--keys: {json.dumps(keys)[:60]} is not a JSON list of position keys")
    return keys


def _cmd_predict_positions(args: argparse.Namespace) -> None:
    from unetflow.plates import read_positions
    from unetflow.predict_positions import predict_positions

    keys = _position_keys(args.keys)
    record = predict_positions(args.checkpoint, read_positions(args.positions, keys), keys,
                               args.stats, args.channels, _section(args, "predict"),
                               args.model, args.dataset, args.output, args.threads,
                               args.record, task=args.task)
    print(f"predict positions: {args.model} on {args.dataset}: {len(record['predicted'])} "
          f"predicted, {len(record['kept'])} kept (up to date) in {record['seconds']} s"
          f"{' on ' + record['device'] if record['device'] else ''} -> {args.output}")


def _cmd_predict_finish(args: argparse.Namespace) -> None:
    from unetflow.plates import read_positions
    from unetflow.predict_positions import finish_plate

    index = finish_plate(read_positions(args.positions), args.output,
                         [_job_record(p, "batch") for p in args.records], args.model, args.dataset,
                         args.checkpoint, _section(args, "predict"), args.index)
    print(f"predict finish: {args.model} on {args.dataset}: {len(index['positions'])} "
          f"positions ({index['kind']}) -> {args.output}")


def _evaluate_section(args: argparse.Namespace) -> dict[str, Any]:
    """The evaluate section; workers left null become the job's --threads."""
    settings = _section(args, "evaluate")
    settings["workers"] = settings["workers"] or args.threads
    return settings


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from unetflow.evaluate import evaluate_prediction

    record = evaluate_prediction(args.prediction, args.image, args.target, args.task,
                                 _evaluate_section(args), args.num_classes, args.channels,
                                 args.model, args.dataset, args.output, baseline=args.baseline,
                                 crop_scores=args.crop_scores, checkpoint=args.checkpoint)
    for method, scores in record["scores"].items():
        shown = {k: v for k, v in scores.items() if not isinstance(v, dict)}
        print(f"evaluate: {args.model} on {args.dataset}: {method}: {json.dumps(shown)}")
    for note in record["notes"]:
        print(f"evaluate: note: {note}")


def _cmd_evaluate_positions(args: argparse.Namespace) -> None:
    from unetflow.evaluate_positions import evaluate_positions
    from unetflow.plates import read_positions

    rows = evaluate_positions(read_positions(args.positions), args.keys, args.prediction,
                              args.task, _section(args, "evaluate"), args.num_classes,
                              args.channels, args.model, args.dataset, args.output,
                              baseline=args.baseline, checkpoint=args.checkpoint)
    metric = "unet.foreground_iou" if args.task == "segmentation" else "unet.psnr"
    for row in rows:
        value = row.get(metric)
        print(f"evaluate-positions: {args.model} on {args.dataset} {row['position']}: "
              f"{metric} {'n/a' if value is None else format(value, '.4g')}")


def _cmd_evaluate_dataset(args: argparse.Namespace) -> None:
    from unetflow.evaluate_positions import aggregate_positions
    from unetflow.plates import read_positions

    record = aggregate_positions(read_positions(args.positions), args.batches, args.task,
                                 args.model, args.dataset, args.output, args.table, args.wells,
                                 args.plate_map)
    for method, scores in record["scores"].items():
        shown = {k: v for k, v in scores.items() if not isinstance(v, dict)}
        print(f"evaluate-dataset: {args.model} on {args.dataset} ({record['positions']} "
              f"positions, {record['aggregate']}): {method}: {json.dumps(shown)}")


def _cmd_tune_baseline(args: argparse.Namespace) -> None:
    from unetflow.evaluate import BASELINE_PARAMETER, tune_baselines

    result = tune_baselines(args.datasets, _section(args, "evaluate"), args.output)
    print(f"tune-baseline: {result['crops']} crops, input MSE {result['input_mse']:.6g}, "
          f"noise sd {', '.join(f'{sd:.4g}' for sd in result['noise_sd'])}")
    for name, tuned in result["baselines"].items():
        parameter = BASELINE_PARAMETER[name]
        print(f"tune-baseline: {name}: {parameter} {tuned[parameter]:g}; MSE by {parameter} "
              f"{json.dumps(tuned[f'mse_by_{parameter}'])}")


def _cmd_montage(args: argparse.Namespace) -> None:
    from unetflow.figures import write_montage

    settings = _evaluate_section(args)
    crops = write_montage(args.prediction, args.image, args.target, args.stats, args.task,
                          args.channels, settings, args.output, args.title,
                          position=args.position, crop_scores=args.crop_scores,
                          workers=settings["workers"])
    print(f"montage: {len(crops)} crops -> {args.output}")


def _cmd_compare(args: argparse.Namespace) -> None:
    from unetflow.figures import write_comparison

    write_comparison(args.summary, args.output)
    print(f"compare: {args.summary} -> {args.output}")


def _cmd_convert(args: argparse.Namespace) -> None:
    from unetflow.convert import convert_tiff

    info = convert_tiff(args.input, args.output, axes=args.axes, pixel_size=args.pixel_size,
                        pyramid_levels=args.pyramid_levels, chunks=args.chunks, role=args.role)
    print(f"convert: {args.input} -> {args.output}: axes {''.join(info['axes'])}, shape "
          f"{info['shape']}, {info['dtype']}, scale {info['scale']} {info['units']}, "
          f"{info['levels']} level(s), chunks {info['chunks']}; pixel sizes from "
          f"{info['pixel_size_source']}")
    if info["unknown_pixel_size"]:
        print(f"convert: warning: no pixel size for axes {info['unknown_pixel_size']} in "
              f"{args.input}; written as 1. Give --pixel-size (or the dataset's pixel_size "
              f"in the config)", file=sys.stderr)


def _cmd_convert_collection(args: argparse.Namespace) -> None:
    from unetflow.convert import convert_tiff
    from unetflow.files import atomic_path
    from unetflow.plates import collection_tiffs

    spec = args.spec
    with atomic_path(args.output_dir) as tmp:
        conversions = collection_tiffs(args.dataset, spec, tmp)
        if not conversions:
            raise ValueError(f"dataset '{args.dataset}': its collection has no TIFF files to "
                             f"convert")
        for tiff, output, role in conversions:
            info = convert_tiff(tiff, output, axes=spec.get("axes"),
                                pixel_size=spec.get("pixel_size"), role=role)
            print(f"convert-collection: {tiff} -> {Path(output).relative_to(tmp)}: axes "
                  f"{''.join(info['axes'])}, shape {info['shape']}, {info['dtype']}")


def _cmd_positions(args: argparse.Namespace) -> None:
    from unetflow.config import dataset_settings
    from unetflow.plates import dataset_positions, positions_digest, write_positions

    spec = dataset_settings(args.dataset, args.spec)
    positions = dataset_positions(args.dataset, spec, converted=args.converted)
    if args.digest and positions_digest(positions) != args.digest:
        raise ValueError(f"dataset '{args.dataset}': its positions changed since the workflow "
                         f"was planned (digest {positions_digest(positions)}, planned "
                         f"{args.digest}); run snakemake again to plan with the new positions")
    write_positions(positions, args.output)
    print(f"positions: {args.dataset}: {len(positions.positions)} positions of the "
          f"{positions.kind} {positions.source} -> {args.output}")


def _cmd_demo_plate(args: argparse.Namespace) -> None:
    from unetflow.plates import clean_plate_path, write_demo_plate

    keys = write_demo_plate(args.output, rows=args.rows, columns=args.columns,
                            fields=args.fields, shape=tuple(args.shape), seed=args.seed,
                            ngff=args.ngff)
    print(f"demo-plate: {len(keys)} fields -> {args.output} (labels/nuclei in each field), "
          f"clean twin -> {clean_plate_path(args.output)}")


def _cmd_summarize(args: argparse.Namespace) -> None:
    from unetflow.evaluate import (
        format_table,
        metric_warnings,
        write_summary,
        write_summary_html,
    )

    rows = write_summary(args.metrics, args.output)
    warnings = metric_warnings(args.metrics)
    if args.html:
        write_summary_html(rows, args.html, warnings)
    print(format_table(rows))
    for line in warnings:
        print(f"warning: {line}")


def _cmd_export(args: argparse.Namespace) -> None:
    from unetflow.export import export_package

    done = export_package(args.checkpoint, args.image, args.channels, args.stats_dataset,
                          args.train_on, _section(args, "export"),
                          section_settings("predict", args.predict), args.metrics or [],
                          args.curve, args.model, args.output)
    crop = done["test_crop"]
    print(f"export: {args.model} -> {args.output} ({done['task']}, halo {done['halo']}, input "
          f"sizes {done['input_size'][0]} + n x {done['input_size'][1]}, test crop "
          f"{crop['shape']} at {crop['origin']} of {crop['image']})")


def _cmd_show(args: argparse.Namespace) -> None:
    import csv

    from unetflow.evaluate import format_table

    with open(args.summary, newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    if args.columns:
        names = args.columns.split(",")
        unknown = [c for c in names if rows and c not in rows[0]]
        if unknown:
            raise ValueError(f"{args.summary}: no column {unknown[0]!r}; its columns are "
                             f"{', '.join(rows[0])}")
        rows = [{c: _short_number(r[c]) for c in names} for r in rows]
    print(format_table(rows))


def _short_number(text: str) -> str:
    """A table cell as shown: numbers with 4 significant digits, anything else as it is."""
    try:
        return f"{float(text):.4g}" if text.strip() and not text.strip().isdigit() else text
    except ValueError:
        return text


def _add(sub, name: str, func, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(func=func, inputs=[])
    return parser


def _settings(parser: argparse.ArgumentParser, section: str, execution: bool = False) -> None:
    parser.add_argument("--settings", type=_json, required=True,
                        help=f"the {section} section (JSON; missing keys take the defaults)")
    if execution:
        parser.add_argument("--execution", type=_json, default={},
                            help=f"how the stage runs: the {section} section's threads, "
                                 f"device... (JSON; apart so that editing them reruns nothing)")


def _task(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=("segmentation", "regression"), default=None,
                        help="the model's task in the config: a checkpoint of another task is "
                             "refused (default: the checkpoint's own)")


def _add_predict(sub) -> None:
    """`unetflow predict create|shard|gather` (what the rules run) and `run` (all three);
    `positions` and `finish` for plates and collections."""
    predict = sub.add_parser("predict", help="tiled prediction into OME-Zarr (NGFF 0.5)",
                             description="tiled prediction: create the raw store, predict its "
                                         "shards, gather the output; or run all three. For a "
                                         "plate or collection: predict batches of positions, "
                                         "then finish")
    steps = predict.add_subparsers(dest="step", required=True,
                                   metavar="{create,shard,gather,run,positions,finish}")
    specs = {
        "create": (_cmd_predict_create, "create the empty raw store the shards write into "
                                        "(reads the checkpoint's description, no network)"),
        "shard": (_cmd_predict_shard, "predict one shard's tiles into the raw store (loads "
                                      "the network on predict.device)"),
        "gather": (_cmd_predict_gather, "write the NGFF 0.5 output from the raw store (no "
                                        "network)"),
        "run": (_cmd_predict_run, "create, predict and gather in this one process"),
    }
    for name, (func, text) in specs.items():
        p = _add(steps, name, func, text)
        _input(p, "--checkpoint", required=True)
        _input(p, "--image", required=True)
        if name != "create":
            _input(p, "--stats", required=True)
        if name in ("shard", "gather"):
            _input(p, "--raw", required=True)
        p.add_argument("--channels", type=_json, default=None)
        _task(p)
        _settings(p, "predict", execution=True)
        p.add_argument("--output", required=True)
        if name != "create":
            p.add_argument("--threads", type=int, default=1, help="the job's threads")
        if name == "shard":
            p.add_argument("--shard", type=int, required=True)
        if name in ("gather", "run"):
            p.add_argument("--model", required=True)
            p.add_argument("--dataset", required=True)
        if name == "gather":
            _input(p, "records", nargs="+", help="the shards' JSON records")
    _add_predict_positions(steps)


def _add_predict_positions(steps) -> None:
    """`unetflow predict positions` (one batch of a plate or collection) and `finish`."""
    p = _add(steps, "positions", _cmd_predict_positions,
             "predict a batch of a plate's or collection's positions, one NGFF image each "
             "(loads the network once; keeps outputs that are up to date)")
    _input(p, "--checkpoint", required=True)
    _input(p, "--positions", required=True, help="the dataset's positions file")
    p.add_argument("--keys", type=_json, default=None,
                   help="the batch's position keys (JSON list; default: all)")
    _input(p, "--stats", required=True)
    p.add_argument("--channels", type=_json, default=None)
    _task(p)
    _settings(p, "predict", execution=True)
    for name in ("model", "dataset"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--threads", type=int, default=1, help="the job's threads")
    p.add_argument("--output", required=True, help="the output plate or collection folder")
    p.add_argument("--record", required=True, help="the batch's JSON record")

    p = _add(steps, "finish", _cmd_predict_finish,
             "after all batches: plate and well metadata, stale positions removed, the index")
    _input(p, "--positions", required=True, help="the dataset's positions file")
    _input(p, "--checkpoint", required=True)
    _settings(p, "predict")
    for name in ("model", "dataset"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--output", required=True, help="the output plate or collection folder")
    p.add_argument("--index", required=True, help="the index JSON to write")
    _input(p, "records", nargs="+", help="the batches' JSON records")


def _add_evaluate_positions(sub) -> None:
    """`unetflow evaluate-positions` (one batch of a plate or collection) and
    `evaluate-dataset` (the batches joined: metrics JSON, tables, plate map)."""
    p = _add(sub, "evaluate-positions", _cmd_evaluate_positions,
             "score a batch of a plate's or collection's positions (one TSV row each)")
    _input(p, "--positions", required=True, help="the dataset's positions file")
    p.add_argument("--keys", type=_json, default=None,
                   help="the batch's position keys (JSON list; default: all)")
    _input(p, "--prediction", required=True, help="the output plate or collection folder")
    _input(p, "--checkpoint", default=None, help="the checkpoint the predictions must come "
                                                 "from (their recorded SHA-256 is checked)")
    p.add_argument("--task", required=True, choices=["segmentation", "regression"])
    p.add_argument("--num-classes", type=int, default=2)
    p.add_argument("--channels", type=_json, default=None)
    _settings(p, "evaluate", execution=True)
    _input(p, "--baseline", default=None, help="tune-baseline's JSON (regression)")
    for name in ("model", "dataset", "output"):
        p.add_argument(f"--{name}", required=True)

    p = _add(sub, "evaluate-dataset", _cmd_evaluate_dataset,
             "join a dataset's batch tables: metrics JSON (mean over positions), per-position "
             "and per-well tables, plate map")
    _input(p, "--positions", required=True, help="the dataset's positions file")
    p.add_argument("--task", required=True, choices=["segmentation", "regression"])
    for name in ("model", "dataset"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--output", required=True, help="the dataset's metrics JSON")
    p.add_argument("--table", required=True, help="the per-position TSV")
    p.add_argument("--wells", required=True, help="the per-well TSV")
    p.add_argument("--plate-map", default=None,
                   help="PNG of the headline metric: a plate map (a collection: its images "
                        "sorted by the score)")
    _input(p, "batches", nargs="+", help="the TSVs of evaluate-positions")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="unetflow", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")

    p = _add(sub, "demo-data", _cmd_demo_data, "generate the synthetic demo OME-Zarr stores")
    p.add_argument("--output-dir", required=True)
    _settings(p, "demo")

    p = _add(sub, "normalize", _cmd_normalize, "compute a dataset's normalization statistics")
    source = p.add_mutually_exclusive_group(required=True)
    _input(source, "--image", help="the dataset's one image")
    _input(source, "--positions",
           help="the positions file of a plate or collection (rule positions writes it)")
    _input(p, "--target", help="with --image and normalize.mask: foreground")
    p.add_argument("--per", choices=["dataset", "position"], default=None,
                   help="with --positions: one set of statistics for the dataset, or one "
                        "per position (default: the positions file's 'normalize')")
    p.add_argument("--dataset", required=True)
    p.add_argument("--channels", type=_json, default=None)
    _settings(p, "normalize")
    p.add_argument("--output", required=True)

    p = _add(sub, "extract-patches", _cmd_extract_patches, "sample patches into a Zarr store")
    p.add_argument("--datasets", type=_json, required=True,
                   help='[{"name", "image", "target", "stats", "channels"}, ...]; a plate or '
                        'collection gives "positions" (its positions file) instead of '
                        '"image" and "target"')
    p.add_argument("--task", required=True, choices=["segmentation", "regression"])
    _settings(p, "patches")
    p.add_argument("--normalize", type=_json, required=True, help="the normalize section")
    p.add_argument("--num-classes", type=int, default=2)
    p.add_argument("--ignore-label", type=int, default=None)
    p.add_argument("--segmentation-target", type=_json, default=None,
                   help='what the model learns from (the model section\'s keys): '
                        'segmentation {"target": "classes" or "boundaries", '
                        '"boundary_width": N}; regression {"target": "n2v"} reads no '
                        'target (the name stays for the rules\' commands)')
    p.add_argument("--store", required=True)
    p.add_argument("--manifest", required=True)

    p = _add(sub, "train", _cmd_train, "train (or resume training) a U-Net on a patch store")
    _input(p, "--store", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--task", required=True, choices=["segmentation", "regression"])
    p.add_argument("--model-settings", type=_json, required=True, help="the model section")
    _settings(p, "train", execution=True)
    for name in ("best", "last", "log", "curve"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--threads", type=int, default=None, help="the job's threads")

    _add_predict(sub)

    p = _add(sub, "evaluate", _cmd_evaluate, "score a prediction and baselines against a target")
    for name in ("prediction", "image", "target"):
        _input(p, f"--{name}", required=True)
    for name in ("output", "model", "dataset"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--task", required=True, choices=["segmentation", "regression"])
    p.add_argument("--channels", type=_json, default=None)
    p.add_argument("--num-classes", type=int, default=2)
    _settings(p, "evaluate", execution=True)
    _input(p, "--baseline", default=None, help="tune-baseline's JSON (regression)")
    _input(p, "--checkpoint", default=None, help="the checkpoint the prediction must come "
                                                 "from (its recorded SHA-256 is checked)")
    p.add_argument("--crop-scores", default=None,
                   help="also write the montage's per-crop errors here (TSV)")
    p.add_argument("--threads", type=int, default=1,
                   help="the job's threads: evaluate.workers when that is null")

    _add_evaluate_positions(sub)

    p = _add(sub, "tune-baseline", _cmd_tune_baseline,
             "tune the regression baselines (Gaussian, TV, NLM) on a model's training datasets")
    p.add_argument("--datasets", type=_json, required=True,
                   help='[{"name", "image", "target", "channels"}, ...]')
    _settings(p, "evaluate")
    p.add_argument("--output", required=True)

    p = _add(sub, "montage", _cmd_montage,
             "PNG of input / prediction / target / error on the best to worst crops")
    for name in ("prediction", "image", "target", "stats"):
        _input(p, f"--{name}", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--task", required=True, choices=["segmentation", "regression"])
    p.add_argument("--channels", type=_json, default=None)
    _settings(p, "evaluate", execution=True)
    p.add_argument("--title", default="")
    p.add_argument("--position", default=None,
                   help="the position of a plate/collection shown (its statistics are used)")
    _input(p, "--crop-scores", default=None,
           help="the crops' errors as evaluate wrote them (TSV); without it the montage "
                "scores them in one pass over the prediction and target")
    p.add_argument("--threads", type=int, default=1,
                   help="the job's threads: evaluate.workers when that is null")

    p = _add(sub, "compare", _cmd_compare, "bar chart of models and baselines from a summary")
    _input(p, "--summary", required=True)
    p.add_argument("--output", required=True)

    p = _add(sub, "convert", _cmd_convert, "convert a TIFF / OME-TIFF stack to OME-Zarr (NGFF 0.5)")
    _input(p, "input", help="a .tif/.tiff file (OME-TIFF, ImageJ or plain)")
    p.add_argument("output", help="the .ome.zarr store to write")
    p.add_argument("--axes", default=None, help="the TIFF's axes in storage order, e.g. zyx")
    p.add_argument("--pixel-size", default=None,
                   help="micrometers per pixel, e.g. x=0.325,y=0.325,z=1 (overrides metadata)")
    p.add_argument("--pyramid-levels", type=int, default=None)
    p.add_argument("--chunks", type=_json, default=None, help="chunk shape as a JSON list")
    p.add_argument("--role", choices=["image", "target"], default="image",
                   help="a target of integer type (labels) gets one resolution level")

    p = _add(sub, "summarize", _cmd_summarize, "collect metrics JSON files into one TSV table")
    p.add_argument("--output", required=True)
    p.add_argument("--html", default=None, help="also write the table as an HTML page")
    _input(p, "metrics", nargs="+")

    p = _add(sub, "export", _cmd_export,
             "write a model's bioimage.io package (model spec 0.5; needs unetflow[bioimageio])")
    _input(p, "--checkpoint", required=True)
    _input(p, "--image", required=True, help="the image the test crop is taken from")
    p.add_argument("--channels", type=_json, default=None)
    p.add_argument("--stats-dataset", required=True,
                   help="the dataset whose statistics (in the checkpoint) the package bakes in")
    p.add_argument("--train-on", type=_json, required=True, help="the model's train_on (JSON)")
    _settings(p, "export")
    p.add_argument("--predict", type=_json, default={},
                   help="the model's predict section (JSON): halo, output_units")
    _input(p, "--curve", default=None, help="the loss curve to attach")
    _input(p, "--metrics", nargs="*", default=None, help="the model's metrics JSON files")
    p.add_argument("--model", required=True)
    p.add_argument("--output", required=True)

    p = _add(sub, "show", _cmd_show, "print a summary TSV (or any TSV table) aligned")
    _input(p, "summary")
    p.add_argument("--columns", default=None,
                   help="only these columns, comma-separated (numbers shortened to 4 digits)")

    p = _add(sub, "positions", _cmd_positions,
             "read and check a plate's or collection's positions into a positions file")
    p.add_argument("--dataset", required=True)
    p.add_argument("--spec", type=_json, required=True,
                   help="the dataset's config entry (JSON: plate or collection, wells, "
                        "fields, labels, target, normalize)")
    p.add_argument("--digest", default=None,
                   help="the positions' digest at planning: refuse if they changed since")
    p.add_argument("--converted", default=None,
                   help="where a collection's TIFFs were converted (convert-collection)")
    p.add_argument("--output", required=True)

    p = _add(sub, "convert-collection", _cmd_convert_collection,
             "convert the TIFF images (and targets) of a collection to OME-Zarr")
    p.add_argument("--dataset", required=True)
    p.add_argument("--spec", type=_json, required=True,
                   help="the dataset's config entry (JSON: collection, target, axes, "
                        "pixel_size)")
    p.add_argument("--output-dir", required=True)

    p = _add(sub, "demo-plate", _cmd_demo_plate,
             "write a synthetic HCS plate of nuclei (labels in each field) and its clean twin")
    p.add_argument("--output", required=True)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--columns", type=int, default=3)
    p.add_argument("--fields", type=int, default=2)
    p.add_argument("--shape", type=_json, default=[256, 256], help="a field's shape (JSON)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ngff", choices=["0.4", "0.5"], default="0.5")
    return parser


def _stage(args: argparse.Namespace) -> str:
    return " ".join(x for x in (args.command, getattr(args, "step", None)) if x)


def peak_memory_line(stage: str, seconds: float) -> str:
    """What a job cost, as the last line of its log: the peak resident memory of this
    process (and of its largest child process, e.g. a data loader worker) and the wall
    time. Users size `mem_mb` from it; bench/scale.py reads it from every job's log."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    children = f" (largest child process {child:.0f} MB)" if child > 0 else ""
    return f"unetflow {stage}: peak RSS {own:.0f} MB{children}, {seconds:.1f} s"


# the arguments naming what a stage writes, first the one named when a write error names
# no file (zarr, dask and matplotlib raise a bare `[Errno 28] No space left on device`)
WRITTEN = ("output", "store", "manifest", "record", "index", "best", "last", "log", "curve",
           "table", "wells", "plate_map", "crop_scores", "html", "output_dir", "model_dir")


def written_paths(args: argparse.Namespace) -> list[str]:
    """What this stage writes, by its arguments (inputs excluded: train's --store is read)."""
    inputs = {dest for dest, _ in getattr(args, "inputs", None) or []}
    paths = [str(getattr(args, dest)) for dest in WRITTEN
             if dest not in inputs and getattr(args, dest, None)]
    if getattr(args, "step", None) == "shard":  # a shard writes its tiles into the raw store
        paths.insert(0, str(args.raw))
    return paths


def out_of_memory(err: BaseException) -> str | None:
    """Which memory ran out, when `err` says that an allocation failed; None otherwise."""
    if isinstance(err, MemoryError):
        return "memory"
    if type(err).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return "GPU memory"
    if isinstance(err, RuntimeError) and "can't allocate memory" in str(err):
        return "memory"  # torch's CPU allocator
    return None


def _memory_line(memory: str, err: BaseException, seconds: float) -> str:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    said = " ".join(str(err).split())[:160] or "no details"
    fix = ("use a GPU with more memory, or smaller batches or tiles (train.batch_size, "
           "predict.tile_shape)" if memory == "GPU memory" else
           "give the job more memory (resources mem_mb; see README \"Memory\"), or make it "
           "need less (smaller tiles or fewer workers)")
    return (f"out of {memory} ({type(err).__name__}: {said}) after {seconds:.1f} s at peak "
            f"RSS {peak:.0f} MB: {fix}; the rerun starts this job again")


def _error_line(err: BaseException, args: argparse.Namespace, seconds: float) -> str | None:
    """The one line for an error a user can fix; None for a bug (its traceback is kept)."""
    from unetflow.files import write_failure

    written = written_paths(args)
    named = getattr(err, "filename", None) if isinstance(err, OSError) else None
    path = named or (written[0] if written else None)  # a bare error: what the stage writes
    failure = write_failure(err, path, tuple(written)) if path else None
    if failure is not None:
        if args.command == "train":
            failure.rerun = "the rerun resumes training from its last saved state"
        return str(failure)
    memory = out_of_memory(err)
    if memory:
        return _memory_line(memory, err, seconds)
    return str(err) if isinstance(err, USER_ERRORS) else None


def main(argv: list[str] | None = None) -> None:
    """Run the stage the command line names. Called without `argv` (the `unetflow` command),
    the stage runs in a forked child so that a kill by the kernel still leaves a line in the
    job's log (unetflow.supervisor); tests call main(argv) and run it in their process."""
    args = build_parser().parse_args(argv)
    if argv is None:
        from unetflow.supervisor import run_in_child

        run_in_child(_stage(args))
    started = time.monotonic()
    notices.forget()
    notices.set_stage(_stage(args))
    try:
        check_inputs(args)
        args.func(args)
    except Exception as err:
        line = _error_line(err, args, time.monotonic() - started)
        if line is None:
            raise
        print(f"unetflow {_stage(args)}: error: {line}", file=sys.stderr)
        sys.exit(1)
    print(peak_memory_line(_stage(args), time.monotonic() - started), flush=True)


if __name__ == "__main__":
    main()
