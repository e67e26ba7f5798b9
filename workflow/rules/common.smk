# Config validation, checks of the data and of the `unetflow` command, wildcard constraints,
# and the input/params functions of all rules.
import json
import os
import re
import time

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.settings.types import DeploymentMethod

from unetflow.checks import DataError, check_datasets, command_problem, planned_images
from unetflow.config import (
    PREDICT_OUTPUT_KEYS,
    ConfigError,
    config_warnings,
    execution_settings,
    has_target,
    model_section,
    trained_elsewhere,
    normalization_stats_settings,
    result_settings,
    training_settings,
    validate_config,
)
from unetflow.convert import use_converted_tiffs
from unetflow.notices import job_warnings
from unetflow.demo_store import demo_store_paths
from unetflow.plates import (
    collection_tiffs,
    position_batches,
    position_output_path,
    positions_digest,
)
from unetflow.targets import N2V, segmentation_target, uses_n2v

try:
    _validated = validate_config(config)
except ConfigError as err:
    raise WorkflowError(f"invalid configuration: {err}") from None
config.clear()
config.update(_validated)
for _warning in config_warnings(config):
    logger.warning(f"unetflow warning: {_warning}")

DATASETS = config["datasets"]
# A TIFF image/target is read from its OME-Zarr conversion (rule convert in convert.smk).
try:
    TIFF_SOURCES = use_converted_tiffs(DATASETS, "results/converted")
except ConfigError as err:
    raise WorkflowError(f"invalid configuration: {err}") from None
MODELS = config["models"]
ENV = "../../envs/unetflow.yaml"
DEMO_ROOT = "data/demo"  # where rule demo_data writes the demo stores (demo.smk)
CONVERTED_COLLECTIONS = "results/converted_collections"  # rule convert_collection (convert.smk)
# The data the config points to, checked from metadata before any job runs (unetflow.checks);
# stores that rules make (demo data, TIFF conversions) are checked as described by their
# settings and the TIFFs' metadata (checks.planned_images), so no setting escapes the checks.
# Plates and collections: their positions are read (and checked) here, once per run, so
# that jobs are planned per batch of positions (POSITION_SETS: name -> plates.PositionSet).
try:
    POSITION_SETS = check_datasets(
        config,
        set(demo_store_paths(DEMO_ROOT).values())
        | {DATASETS[name][role] for name, role in TIFF_SOURCES},
        converted=CONVERTED_COLLECTIONS,
        planned=planned_images(config, DEMO_ROOT, TIFF_SOURCES),
    )
except DataError as err:
    raise WorkflowError(f"invalid data:\n{err}") from None


# The rules run the `unetflow` command: without it on PATH and without --sdm conda, stop before
# any job instead of failing each one with exit 127 said only in its log. The main process
# checks in onstart, which Snakemake runs only when jobs are about to run (not for dry runs,
# --lint, --report, or when nothing is to be done); a cluster job step (run with --no-hooks,
# on the PATH the cluster gives it: SLURM's is the submit shell's) checks when it parses this.
def check_unetflow_command():
    with_conda = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
    problem = command_problem("unetflow", conda=with_conda)
    if problem:
        raise WorkflowError(problem)


if workflow.remote_exec:
    check_unetflow_command()


onstart:
    if not workflow.touch:  # --touch only marks outputs as up to date: it runs no command
        check_unetflow_command()


# Warnings that change what a result means (a constant channel, chunks read as fill value,
# sampled statistics, an empty target) are said in the job logs; when the run ends they are
# repeated here, in the terminal, so that a run ending with exit 0 does not hide them.
RUN_STARTED = time.time()


def repeat_job_warnings():
    for line in job_warnings("logs", RUN_STARTED):
        logger.warning(f"unetflow warning: {line}")


onsuccess:
    repeat_job_warnings()


onerror:
    repeat_job_warnings()


def name_pattern(names):
    """A wildcard constraint matching exactly these dataset names ("(?!)" matches none)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


# collections of TIFFs: name -> [(TIFF, conversion, role)]
TIFF_COLLECTIONS = {
    d: collection_tiffs(d, DATASETS[d], f"{CONVERTED_COLLECTIONS}/{d}")
    for d, s in POSITION_SETS.items()
    if s.kind == "collection"
}
TIFF_COLLECTIONS = {d: tiffs for d, tiffs in TIFF_COLLECTIONS.items() if tiffs}
# Rules for one image and rules for plates/collections produce the same file names (metrics,
# statistics): their dataset constraints keep them apart.
IMAGE_DATASET = name_pattern(d for d in DATASETS if d not in POSITION_SETS)
POSITIONS_DATASET = name_pattern(POSITION_SETS)
PLATE_DATASET = name_pattern(d for d, s in POSITION_SETS.items() if s.kind == "plate")
COLLECTION_DATASET = name_pattern(d for d, s in POSITION_SETS.items() if s.kind != "plate")
TIFF_COLLECTION_DATASET = name_pattern(TIFF_COLLECTIONS)
# models trained here (train_on): only they have a train rule and are exported
TRAINED_MODELS = [m for m, spec in MODELS.items() if not trained_elsewhere(spec)]
TRAINED_MODEL = name_pattern(TRAINED_MODELS)


wildcard_constraints:
    dataset="|".join(DATASETS),
    model="|".join(MODELS),


def as_json(value):
    """Params are passed as JSON text: plain data, compared by value for rerun decisions."""
    return json.dumps(value, sort_keys=True)


def stats_path(dataset):
    return f"results/normalization/{dataset}.json"


def checkpoint_path(model, which):
    return f"results/{model}/checkpoint_{which}.pt"


def prediction_path(model, dataset):
    return f"results/{model}/predictions/{dataset}.ome.zarr"


def metrics_path(model, dataset):
    return f"results/{model}/metrics/{dataset}.json"


def evaluated_pairs():
    return [
        (m, d)
        for m, spec in MODELS.items()
        for d in spec["predict_on"]
        if DATASETS[d].get("target") or DATASETS[d].get("labels")
    ]


def prediction_output(model, dataset):
    """The prediction output that the target rule all asks for (the image, or the index of a
    plate or collection)."""
    if dataset in POSITION_SETS:
        return prediction_index_path(model, dataset)
    return prediction_path(model, dataset)


def all_outputs(wildcards):
    outputs = [prediction_output(m, d) for m, spec in MODELS.items() for d in spec["predict_on"]]
    outputs += [checkpoint_path(m, "best") for m in TRAINED_MODELS]
    if evaluated_pairs():
        outputs.append("results/summary.tsv")
        outputs += report_figures()  # montages and the comparison chart (below)
    if config["export"]["enabled"]:
        outputs += [package_path(m) for m in TRAINED_MODELS]
    return outputs


# --- demo_data / convert -----------------------------------------------------------------
def demo_output_dir(wildcards, output):
    """The folder holding all demo stores, read from the rule's outputs (one place for it)."""
    return os.path.commonpath(list(output))


def tiff_source(wildcards):
    key = (wildcards.dataset, wildcards.role)
    if key not in TIFF_SOURCES:
        raise WorkflowError(
            f"dataset '{wildcards.dataset}' has no TIFF {wildcards.role} to convert"
        )
    return TIFF_SOURCES[key]


def convert_args(wildcards):
    """--axes / --pixel-size from the dataset's config entry, when given."""
    ds = DATASETS[wildcards.dataset]
    args = []
    if ds.get("axes"):
        args.append(f"--axes {ds['axes']}")
    if ds.get("pixel_size"):
        sizes = ",".join(f"{axis}={size}" for axis, size in sorted(ds["pixel_size"].items()))
        args.append(f"--pixel-size {sizes}")
    return " ".join(args)


# --- normalize ---------------------------------------------------------------------------
def normalize_inputs(wildcards):
    ds = DATASETS[wildcards.dataset]
    inputs = {"image": ds["image"]}
    if config["normalize"]["mask"] == "foreground" and ds.get("target"):
        inputs["target"] = ds["target"]
    return inputs


def single_quoted(text):
    """POSIX shell quoting that is always '...' (so params of plain paths stay as they were
    under repr(), which is not shell quoting: a path with ' and $(...) would run code)."""
    escaped = text.replace("'", "'\"'\"'")
    return f"'{escaped}'"


def normalize_target_arg(wildcards, input):
    return f"--target {single_quoted(input.target)}" if "target" in input.keys() else ""


def normalize_settings(wildcards):
    settings = normalization_stats_settings(config)
    if wildcards.dataset in POSITION_SETS:  # how many positions dataset statistics read
        settings["sample_positions"] = config["normalize"]["sample_positions"]
    return as_json(settings)


def dataset_channels(wildcards):
    return as_json(DATASETS[wildcards.dataset]["channels"])


# --- extract_patches ---------------------------------------------------------------------
def patch_datasets(model):
    return MODELS[model]["train_on"]


def learns_from_images(model):
    """model.target n2v: the model reads no target in training (a dataset's target, when
    given, only evaluates it)."""
    return uses_n2v(model_section(config, model, "model"))


def extract_inputs(wildcards):
    names = patch_datasets(wildcards.model)
    images = [d for d in names if d not in POSITION_SETS]
    with_targets = not learns_from_images(wildcards.model)
    return {
        "images": [DATASETS[d]["image"] for d in images],
        "targets": [DATASETS[d]["target"] for d in images if with_targets],
        "positions": [positions_path(d) for d in names if d in POSITION_SETS],
        "stats": [stats_path(d) for d in names],
    }


def extract_dataset_entry(name, with_target=True):
    """A dataset as extract-patches reads it: its image and target (none for n2v), or its
    positions file."""
    entry = {"name": name, "stats": stats_path(name), "channels": DATASETS[name]["channels"]}
    if name in POSITION_SETS:
        return {**entry, "positions": positions_path(name)}
    target = DATASETS[name]["target"] if with_target else None
    return {**entry, "image": DATASETS[name]["image"], "target": target}


def extract_datasets(wildcards):
    with_targets = not learns_from_images(wildcards.model)
    return as_json(
        [extract_dataset_entry(d, with_targets) for d in patch_datasets(wildcards.model)]
    )


def section_json(section, leave_out=()):
    """A params function: the model's effective `section` as JSON, less the settings of how
    the stage runs (config.EXECUTION_KEYS: passed as resources, see execution_json) and the
    keys in `leave_out`."""

    def params(wildcards):
        settings = model_section(config, wildcards.model, section)
        return as_json(result_settings(section, settings, leave_out))

    return params


def execution_json(section):
    """A resources function: the section's settings of how a stage runs (threads, device,
    workers: config.EXECUTION_KEYS) as JSON. Snakemake does not compare resources for rerun
    decisions, so editing them reruns nothing; the CLI merges them back (--execution)."""

    def resource(wildcards):
        settings = model_section(config, wildcards.model, section)
        return as_json(execution_settings(section, settings))

    return resource


def apply_normalization(wildcards):
    norm = model_section(config, wildcards.model, "normalize")
    return as_json({"method": norm["method"], "clip": norm["clip"]})


def train_settings_json(wildcards):
    """The train section less the settings of how it runs and those inert for this model
    (config.training_settings): editing or adding an inert key retrains nothing."""
    settings = model_section(config, wildcards.model, "train")
    arch = model_section(config, wildcards.model, "model")
    return as_json(result_settings("train", training_settings(settings, arch)))


def train_gpus(wildcards):
    """train.gpus: the GPUs (ranks) a train job asks for; on SLURM one task that sees them
    all (the plugin passes no --ntasks-per-gpu unless `tasks` is set, which it is not)."""
    return model_section(config, wildcards.model, "train")["gpus"]


def model_task(wildcards):
    return MODELS[wildcards.model]["task"]


def num_classes(wildcards):
    return model_section(config, wildcards.model, "model")["num_classes"]


def segmentation_target_json(wildcards):
    """What a segmentation network learns from the labels (model.target and its width), or
    that a regression model learns from its images alone (n2v): a param of
    extract_patches, so changing it reruns from extraction."""
    arch = model_section(config, wildcards.model, "model")
    if model_task(wildcards) == "segmentation":
        return as_json(segmentation_target(arch))
    return as_json({"target": N2V} if uses_n2v(arch) else {})


def ignore_label_arg(wildcards):
    label = model_section(config, wildcards.model, "train")["ignore_label"]
    return "" if label is None else f"--ignore-label {int(label)}"


# --- train -------------------------------------------------------------------------------
def train_inputs(wildcards):
    """The patch store, and the checkpoint fine-tuning starts from (train.init_from), so
    that Snakemake first trains the model it comes from."""
    inputs = {"store": f"results/{wildcards.model}/patches.zarr"}
    init_from = model_section(config, wildcards.model, "train")["init_from"]
    if init_from:
        inputs["init_from"] = init_from
    return inputs


# --- predict / evaluate ------------------------------------------------------------------
def predict_checkpoint(wildcards):
    """The checkpoint a model predicts with (predict.checkpoint: best or last), or the
    package or checkpoint it comes from (no train rule: the file is the input)."""
    source = trained_elsewhere(MODELS[wildcards.model])
    if source:
        return MODELS[wildcards.model][source]
    which = model_section(config, wildcards.model, "predict")["checkpoint"]
    return checkpoint_path(wildcards.model, which)


def predict_create_inputs(wildcards):
    """The checkpoint (its description plans the tiles) and the image: no statistics."""
    return {
        "checkpoint": predict_checkpoint(wildcards),
        "image": DATASETS[wildcards.dataset]["image"],
    }


def predict_inputs(wildcards):
    return {**predict_create_inputs(wildcards), "stats": stats_path(wildcards.dataset)}


def predict_shard_count(wildcards):
    return model_section(config, wildcards.model, "predict")["shards"]


# The predict keys that decide the raw tiles (params of predict_create/predict_shard): all but
# those that only change how the gather writes the output (config.PREDICT_OUTPUT_KEYS), so
# editing those reruns the gather, not the shards.
predict_tile_settings = section_json("predict", PREDICT_OUTPUT_KEYS)


def predict_shard_records(wildcards):
    folder = f"results/{wildcards.model}/predictions/{wildcards.dataset}.shards"
    return [f"{folder}/shard_{i}.json" for i in range(predict_shard_count(wildcards))]


def evaluate_inputs(wildcards):
    ds = DATASETS[wildcards.dataset]
    return {
        "prediction": prediction_path(wildcards.model, wildcards.dataset),
        "image": ds["image"],
        "target": ds["target"],
    }


def all_metrics(wildcards):
    return [metrics_path(m, d) for m, d in evaluated_pairs()]


# --- evaluate: baselines, figures, report ----------------------------------------------
def evaluate_settings(*keys):
    """A params function: these keys of the model's evaluate section, so editing one reruns
    only the rules that use it; ignore_label falls back to the model's train.ignore_label."""

    def params(wildcards):
        settings = model_section(config, wildcards.model, "evaluate")
        if settings["ignore_label"] is None:
            train = model_section(config, wildcards.model, "train")
            settings["ignore_label"] = train["ignore_label"]
        return as_json({k: settings[k] for k in keys})

    return params


def baseline_path(model):
    return f"results/{model}/baselines.json"


def montage_path(model, dataset):
    return f"results/{model}/figures/{dataset}_montage.png"


def evaluation_inputs(wildcards):
    """What evaluate reads, and the checkpoint the prediction must have been made with."""
    inputs = {**evaluate_inputs(wildcards), "checkpoint": predict_checkpoint(wildcards)}
    if MODELS[wildcards.model]["task"] == "regression" and baseline_datasets(wildcards.model):
        inputs["baseline"] = baseline_path(wildcards.model)
    return inputs


def baseline_arg(wildcards, input):
    return f"--baseline {single_quoted(input.baseline)}" if "baseline" in input.keys() else ""


BASELINE_POSITIONS = 4  # positions of a plate/collection the baselines are tuned on


def baseline_images(name):
    """(name, image, target) the baselines are tuned on: the image, or a few
    positions spread over a plate/collection (its crops are what is scored, not all pixels)."""
    if name not in POSITION_SETS:
        return [(name, DATASETS[name]["image"], DATASETS[name]["target"])]
    positions = POSITION_SETS[name].positions
    step = max(1, len(positions) // BASELINE_POSITIONS)
    return [(f"{name}/{p.key}", p.image, p.target) for p in positions[::step][:BASELINE_POSITIONS]]


def baseline_datasets(model):
    """The model's training datasets that have targets, which the baselines are tuned on
    (all of them, except for an n2v model, which may train on images that have none)."""
    return [d for d in MODELS[model]["train_on"] if has_target(DATASETS[d])]


def tune_baseline_inputs(wildcards):
    names = baseline_datasets(wildcards.model)
    used = [e for d in names if d not in TIFF_COLLECTIONS for e in baseline_images(d)]
    return {
        "images": [e[1] for e in used],
        "targets": [e[2] for e in used],
        # the conversions of a collection of TIFFs are made as one folder
        "converted": [f"{CONVERTED_COLLECTIONS}/{d}" for d in names if d in TIFF_COLLECTIONS],
    }


def tune_baseline_datasets(wildcards):
    return as_json(
        [
            {"name": n, "image": image, "target": target, "channels": DATASETS[d]["channels"]}
            for d in baseline_datasets(wildcards.model)
            for n, image, target in baseline_images(d)
        ]
    )


def montage_inputs(wildcards):
    """What the montage draws from, and the per-crop errors that evaluate summed, so the
    montage reads only the crops it shows. The errors are ancient(): they depend only on
    the prediction, the target, ignore_label and montage_crop_size, which are the montage's
    own inputs and params, so re-scoring (say, a new iou_threshold) redraws nothing."""
    crops = f"results/{wildcards.model}/metrics/{wildcards.dataset}.crops.tsv"
    return {
        **evaluate_inputs(wildcards),
        "stats": stats_path(wildcards.dataset),
        "crop_scores": ancient(crops),
    }


def montage_title(wildcards):
    return f"model {wildcards.model} on dataset {wildcards.dataset}"


def report_figures():
    """Report pages that rule all asks for, so `snakemake --report` finds them all."""
    figures = [montage_path(m, d) for m, d in evaluated_pairs()]
    figures += [
        plate_map_path(m, d)
        for m, d in evaluated_pairs()
        if d in POSITION_SETS and POSITION_SETS[d].kind == "plate"
    ]
    return figures + ["results/summary.html", "results/comparison.png"]


# --- plates and collections: positions, batches of positions -------------------------------
# A plate or collection is planned from its positions (read at parse time into POSITION_SETS)
# and worked on in batches of predict.positions_per_job positions: one prediction job and one
# evaluation job per batch, not per position. See README "Plates and collections".
def positions_path(dataset):
    return f"results/positions/{dataset}.json"


def positions_inputs(wildcards):
    """What the positions are read from: the plate, or the collection's images (and the
    target plate); their changes rerun rule positions."""
    spec = DATASETS[wildcards.dataset]
    position_set = POSITION_SETS[wildcards.dataset]
    sources = [spec["plate"]] if spec.get("plate") else [p.image for p in position_set.positions]
    if spec.get("target"):
        target = position_set.target["source"]
        sources += [target] if spec.get("plate") else [p.target for p in position_set.positions]
    if wildcards.dataset in TIFF_COLLECTIONS:  # the conversions stand in for the TIFFs
        converted = {out for _, out, _ in TIFF_COLLECTIONS[wildcards.dataset]}
        sources = [s for s in sources if s not in converted]
        sources.append(f"{CONVERTED_COLLECTIONS}/{wildcards.dataset}")
    return sources


def collection_tiff_files(wildcards):
    return [tiff for tiff, _, _ in TIFF_COLLECTIONS[wildcards.dataset]]


def convert_collection_spec(wildcards):
    spec = DATASETS[wildcards.dataset]
    return as_json({k: spec.get(k) for k in ("collection", "target", "axes", "pixel_size")})


POSITIONS_SPEC_KEYS = ("plate", "collection", "wells", "fields", "labels", "target", "normalize")


def positions_spec(wildcards):
    spec = DATASETS[wildcards.dataset]
    return as_json({k: spec.get(k) for k in POSITIONS_SPEC_KEYS})


def planned_digest(wildcards):
    """A digest of the positions read at planning: when the plate gains or loses fields
    (the config unchanged), rule positions reruns; the job checks it reads the same."""
    return positions_digest(POSITION_SETS[wildcards.dataset])


def normalize_positions_per(wildcards):
    return DATASETS[wildcards.dataset]["normalize"]


def dataset_batches(model, dataset):
    per_job = model_section(config, model, "predict")["positions_per_job"]
    return position_batches(POSITION_SETS[dataset].keys, per_job)


def prediction_root(model, dataset):
    """Where a plate's/collection's predictions go: an output plate, or a folder of images."""
    if POSITION_SETS[dataset].kind == "plate":
        return f"results/{model}/predictions/{dataset}.ome.zarr"
    return f"results/{model}/predictions/{dataset}"


def prediction_index_path(model, dataset):
    return f"results/{model}/predictions/{dataset}.index.json"


def batch_record_path(model, dataset, batch):
    return f"results/{model}/predictions/{dataset}.batches/batch_{batch}.json"


def batch_metrics_path(model, dataset, batch):
    return f"results/{model}/metrics/{dataset}.batches/batch_{batch}.tsv"


def plate_map_path(model, dataset):
    return f"results/{model}/figures/{dataset}_platemap.png"


def batch_keys(wildcards):
    batches = dataset_batches(wildcards.model, wildcards.dataset)
    index = int(wildcards.batch)
    if index >= len(batches):
        raise WorkflowError(
            f"dataset '{wildcards.dataset}' has {len(batches)} batches of positions; "
            f"there is no batch {index}"
        )
    return as_json(batches[index])


def root_of_predictions(wildcards):
    return prediction_root(wildcards.model, wildcards.dataset)


def predict_positions_inputs(wildcards):
    return {
        "checkpoint": predict_checkpoint(wildcards),
        "positions": positions_path(wildcards.dataset),
        "stats": stats_path(wildcards.dataset),
    }


def all_batch_records(wildcards):
    count = len(dataset_batches(wildcards.model, wildcards.dataset))
    return [batch_record_path(wildcards.model, wildcards.dataset, i) for i in range(count)]


def evaluate_positions_inputs(wildcards):
    inputs = {
        "positions": positions_path(wildcards.dataset),
        "record": batch_record_path(wildcards.model, wildcards.dataset, wildcards.batch),
        "checkpoint": predict_checkpoint(wildcards),
    }
    if MODELS[wildcards.model]["task"] == "regression":
        inputs["baseline"] = baseline_path(wildcards.model)
    return inputs


def all_batch_metrics(wildcards):
    count = len(dataset_batches(wildcards.model, wildcards.dataset))
    return [batch_metrics_path(wildcards.model, wildcards.dataset, i) for i in range(count)]


def plate_map_arg(wildcards, output):
    return f"--plate-map {single_quoted(output.plate_map)}" if "plate_map" in output.keys() else ""


def montage_position(wildcards):
    """The position a plate's/collection's montage shows: its first."""
    return POSITION_SETS[wildcards.dataset].positions[0]


def montage_positions_inputs(wildcards):
    return {
        "index": prediction_index_path(wildcards.model, wildcards.dataset),
        "stats": stats_path(wildcards.dataset),
    }


def montage_position_args(wildcards):
    """--prediction/--image/--target/--position of the montage's position."""
    position = montage_position(wildcards)
    root = prediction_root(wildcards.model, wildcards.dataset)
    kind = POSITION_SETS[wildcards.dataset].kind
    paths = {
        "--prediction": position_output_path(root, kind, position),
        "--image": position.image,
        "--target": position.target,
        "--position": position.key,
    }
    return " ".join(f"{flag} {single_quoted(path)}" for flag, path in paths.items())


def montage_position_title(wildcards):
    position = montage_position(wildcards).key
    return f"model {wildcards.model} on dataset {wildcards.dataset}, position {position}"


# --- export: bioimage.io packages (export.smk) --------------------------------------------
def package_path(model):
    return f"results/{model}/{model}.bioimageio.zip"


def crop_dataset(model):
    """The dataset the package's test crop comes from: the first held-out one (predict_on),
    else the first it trained on."""
    spec = MODELS[model]
    return (spec["predict_on"] or spec["train_on"])[0]


def crop_image(dataset):
    """The image of a dataset, or the first position's of a plate or collection."""
    if dataset in POSITION_SETS:
        return POSITION_SETS[dataset].positions[0].image
    return DATASETS[dataset]["image"]


def export_inputs(wildcards):
    """The checkpoint prediction uses, the crop's image, the loss curve, and the model's
    metrics (so the package is made after evaluate, and its README has the scores)."""
    dataset = crop_dataset(wildcards.model)
    inputs = {
        "checkpoint": predict_checkpoint(wildcards),
        "image": crop_image(dataset),
        "curve": f"results/{wildcards.model}/loss_curve.png",
        "metrics": [metrics_path(m, d) for m, d in evaluated_pairs() if m == wildcards.model],
    }
    if dataset in TIFF_COLLECTIONS:  # the positions' conversions are made as one folder
        inputs["converted"] = f"{CONVERTED_COLLECTIONS}/{dataset}"
    return inputs


def export_args(wildcards):
    """--stats-dataset, --train-on, --channels and --predict (halo, output_units) as
    quoted command-line arguments."""
    model = wildcards.model
    predict = model_section(config, model, "predict")
    spec = MODELS[model]
    values = {
        "--stats-dataset": spec["train_on"][0],
        "--train-on": as_json(spec["train_on"]),
        "--channels": as_json(DATASETS[crop_dataset(model)]["channels"]),
        "--predict": as_json({k: predict[k] for k in ("halo", "output_units")}),
    }
    return " ".join(f"{flag} {single_quoted(value)}" for flag, value in values.items())


def export_settings(wildcards):
    """The export section less `enabled` (which only says whether rule all asks)."""
    return as_json({k: v for k, v in config["export"].items() if k != "enabled"})
