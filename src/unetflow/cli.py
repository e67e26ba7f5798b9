"""The `unetflow` command: one subcommand per workflow stage.

Snakemake rules call these with paths and the JSON of exactly the config section a stage
depends on; users can call them by hand the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["main", "build_parser"]


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from err


def _cmd_demo_data(args: argparse.Namespace) -> None:
    from unetflow.demo_store import write_demo_data

    for name, path in write_demo_data(args.output_dir, args.settings).items():
        print(f"demo_data: {name} -> {path}")


def _cmd_normalize(args: argparse.Namespace) -> None:
    from unetflow.normalize import compute_dataset_stats, write_stats

    stats = compute_dataset_stats(args.image, args.channels, args.settings, args.dataset,
                                  target_path=args.target)
    write_stats(stats, args.output)
    for ch in stats["channels"]:
        print(f"normalize: {args.dataset} channel {ch['name']}: mean {ch['mean']:.4g} "
              f"std {ch['std']:.4g} min {ch['min']:.4g} max {ch['max']:.4g} "
              f"percentiles {ch['percentiles']}")
        if ch["max"] == ch["min"]:
            print(f"normalize: warning: dataset '{args.dataset}' channel {ch['name']} of "
                  f"{args.image} is constant ({ch['min']:.4g}); it normalizes to 0 everywhere, "
                  f"so a model learns nothing from it: check the image", file=sys.stderr)


def _cmd_extract_patches(args: argparse.Namespace) -> None:
    from unetflow.patches import DatasetInput, extract_patches, summarize_records

    datasets = [DatasetInput(**d) for d in args.datasets]
    records = extract_patches(datasets, args.task, args.settings, args.normalize,
                              args.num_classes, args.ignore_label, args.store, args.manifest)
    for line in summarize_records(records):
        print(f"extract_patches: {line}")


def _cmd_train(args: argparse.Namespace) -> None:
    from unetflow.train import Preempted, train_model

    try:
        train_model(args.store, args.model_dir, args.task, args.model_settings, args.settings,
                    args.best, args.last, args.log, args.curve, threads=args.threads)
    except Preempted as stop:
        print(f"train: {stop}", file=sys.stderr, flush=True)
        sys.exit(143)


def _cmd_predict(args: argparse.Namespace) -> None:
    from unetflow.predict import predict_to_ome_zarr

    predict_to_ome_zarr(args.checkpoint, args.image, args.stats, args.channels, args.settings,
                        args.output, args.model, args.dataset, threads=args.threads)
    print(f"predict: {args.model} on {args.dataset} -> {args.output}")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from unetflow.evaluate import evaluate_prediction

    record = evaluate_prediction(args.prediction, args.image, args.target, args.task,
                                 args.settings, args.num_classes, args.channels, args.model,
                                 args.dataset, args.output, baseline=args.baseline)
    for method, scores in record["scores"].items():
        shown = {k: v for k, v in scores.items() if not isinstance(v, dict)}
        print(f"evaluate: {args.model} on {args.dataset}: {method}: {json.dumps(shown)}")
    for note in record["notes"]:
        print(f"evaluate: note: {note}")


def _cmd_tune_baseline(args: argparse.Namespace) -> None:
    from unetflow.evaluate import tune_gaussian_baseline

    result = tune_gaussian_baseline(args.datasets, args.settings, args.output)
    print(f"tune-baseline: sigma {result['sigma']:g} px from {result['crops']} crops; "
          f"MSE by sigma {json.dumps(result['mse_by_sigma'])}")


def _cmd_montage(args: argparse.Namespace) -> None:
    from unetflow.figures import write_montage

    crops = write_montage(args.prediction, args.image, args.target, args.stats, args.task,
                          args.channels, args.settings, args.output, args.title)
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


def _cmd_summarize(args: argparse.Namespace) -> None:
    from unetflow.evaluate import format_table, write_summary, write_summary_html

    rows = write_summary(args.metrics, args.output)
    if args.html:
        write_summary_html(rows, args.html)
    print(format_table(rows))


def _cmd_show(args: argparse.Namespace) -> None:
    import csv

    from unetflow.evaluate import format_table

    with open(args.summary, newline="") as fh:
        print(format_table(list(csv.DictReader(fh, delimiter="\t"))))


def _add(sub, name: str, func, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unetflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = _add(sub, "demo-data", _cmd_demo_data, "generate the synthetic demo OME-Zarr stores")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--settings", type=_json, required=True, help="the config's demo section")

    p = _add(sub, "normalize", _cmd_normalize, "compute a dataset's normalization statistics")
    p.add_argument("--image", required=True)
    p.add_argument("--target")
    p.add_argument("--dataset", required=True)
    p.add_argument("--channels", type=_json, default=None)
    p.add_argument("--settings", type=_json, required=True, help="the normalize section")
    p.add_argument("--output", required=True)

    p = _add(sub, "extract-patches", _cmd_extract_patches, "sample patches into a Zarr store")
    p.add_argument("--datasets", type=_json, required=True,
                   help='[{"name", "image", "target", "stats", "channels"}, ...]')
    p.add_argument("--task", required=True, choices=["segmentation", "regression"])
    p.add_argument("--settings", type=_json, required=True, help="the patches section")
    p.add_argument("--normalize", type=_json, required=True, help="the normalize section")
    p.add_argument("--num-classes", type=int, default=2)
    p.add_argument("--ignore-label", type=int, default=None)
    p.add_argument("--store", required=True)
    p.add_argument("--manifest", required=True)

    p = _add(sub, "train", _cmd_train, "train (or resume training) a U-Net on a patch store")
    p.add_argument("--store", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--task", required=True, choices=["segmentation", "regression"])
    p.add_argument("--model-settings", type=_json, required=True, help="the model section")
    p.add_argument("--settings", type=_json, required=True, help="the train section")
    for name in ("best", "last", "log", "curve"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--threads", type=int, default=None)

    p = _add(sub, "predict", _cmd_predict, "tiled prediction of one dataset into OME-Zarr")
    for name in ("checkpoint", "image", "stats", "output", "model", "dataset"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--channels", type=_json, default=None)
    p.add_argument("--settings", type=_json, required=True, help="the predict section")
    p.add_argument("--threads", type=int, default=1)

    p = _add(sub, "evaluate", _cmd_evaluate, "score a prediction and baselines against a target")
    for name in ("prediction", "image", "target", "output", "model", "dataset"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--task", required=True, choices=["segmentation", "regression"])
    p.add_argument("--channels", type=_json, default=None)
    p.add_argument("--num-classes", type=int, default=2)
    p.add_argument("--settings", type=_json, required=True, help="the evaluate section")
    p.add_argument("--baseline", default=None, help="tune-baseline's JSON (regression)")

    p = _add(sub, "tune-baseline", _cmd_tune_baseline,
             "choose the Gaussian baseline's sigma on a model's training datasets")
    p.add_argument("--datasets", type=_json, required=True,
                   help='[{"name", "image", "target", "channels"}, ...]')
    p.add_argument("--settings", type=_json, required=True, help="the evaluate section")
    p.add_argument("--output", required=True)

    p = _add(sub, "montage", _cmd_montage,
             "PNG of input / prediction / target / error on the best to worst crops")
    for name in ("prediction", "image", "target", "stats", "output"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--task", required=True, choices=["segmentation", "regression"])
    p.add_argument("--channels", type=_json, default=None)
    p.add_argument("--settings", type=_json, required=True, help="the evaluate section")
    p.add_argument("--title", default="")

    p = _add(sub, "compare", _cmd_compare, "bar chart of models and baselines from a summary")
    p.add_argument("--summary", required=True)
    p.add_argument("--output", required=True)

    p = _add(sub, "convert", _cmd_convert, "convert a TIFF / OME-TIFF stack to OME-Zarr (NGFF 0.5)")
    p.add_argument("input", help="a .tif/.tiff file (OME-TIFF, ImageJ or plain)")
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
    p.add_argument("metrics", nargs="+")

    p = _add(sub, "show", _cmd_show, "print a summary TSV as an aligned table")
    p.add_argument("summary")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"unetflow {args.command}: error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
