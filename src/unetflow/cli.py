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


def _cmd_extract_patches(args: argparse.Namespace) -> None:
    from collections import Counter

    from unetflow.patches import DatasetInput, extract_patches

    datasets = [DatasetInput(**d) for d in args.datasets]
    records = extract_patches(datasets, args.task, args.settings, args.normalize,
                              args.num_classes, args.ignore_label, args.store, args.manifest)
    counts = Counter((r["dataset"], r["split"], r["kind"]) for r in records)
    for (dataset, split, kind), n in sorted(counts.items()):
        print(f"extract_patches: {dataset} {split} {kind}: {n} patches")


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
                                 args.dataset, args.output)
    print(f"evaluate: {json.dumps(record['scores'])}")


def _cmd_summarize(args: argparse.Namespace) -> None:
    from unetflow.evaluate import format_table, write_summary

    print(format_table(write_summary(args.metrics, args.output)))


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

    p = _add(sub, "summarize", _cmd_summarize, "collect metrics JSON files into one TSV table")
    p.add_argument("--output", required=True)
    p.add_argument("metrics", nargs="+")

    p = _add(sub, "show", _cmd_show, "print a summary TSV as an aligned table")
    p.add_argument("summary")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"unetflow {args.command}: error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
