"""Positions: the images a dataset is made of, read from an HCS plate or a glob of images.

A screen is thousands of images: the fields of view of an NGFF HCS plate (0.4 on zarr v2,
0.5 on zarr v3), or a folder of OME-Zarr images. The workflow plans and fans out work per
*position* (one such image), so this module turns a plate or a glob into a list of
`Position`s with stable, path-safe keys, checks that they agree, and is the one owner of
the plate layout (it also writes the synthetic demo plate).

Keys (used as file names and Snakemake wildcard values, so only ``[A-Za-z0-9._-]``):
- plate: ``<well>_<field>``, e.g. ``B03_0``: the row name, the column name zero-padded to
  two digits, and the field's index in the well's image list. A row that is not letters or
  a column that is not digits gives ``<row>-<column>`` instead (``r1-c2_0``). Keys do not
  change when wells are added to the selection or to the plate.
- collection: the matched path relative to the glob's fixed prefix (the directories before
  the first wildcard), without ``.ome.zarr``/``.zarr``/``.tif(f)``, directories joined by
  ``__`` and any other character replaced by ``_``: ``data/screen/*/*.ome.zarr`` gives
  ``ctrl__img01`` for ``data/screen/ctrl/img01.ome.zarr``. Two paths giving one key are
  refused.

Wells are selected as users write them: ``B03``, ``B3``, ``b03`` or the plate's own path
``B/3`` (``B/03`` too); all name the well with row ``B`` and column ``3``.

Cost, measured with ``bench/positions.py`` on a plate of 384 wells x 9 fields = 3,456
positions (32x32 fields with labels/nuclei), on this 2-core machine while a CI run of the
test suite (pytest, Snakemake, prediction) kept the load average at 2.5-3.3; seconds per
1,000 positions, median of 3, NGFF 0.5 / 0.4:
- `plate_positions` (plate and well metadata): 0.06 / 0.09 s;
- `check_positions` (including `plate_positions`): 0.21 / 0.21 s, and 0.37 / 0.42 s with
  ``labels="nuclei"``;
- the same check through `ome.open_image` instead of reading the JSON: 4.2 / 4.7 s (zarr's
  event loop and dask's tokenizing), a fifth of the 20 s per 1,000 positions that all of
  planning may take; hence the metadata reader.
So reading and checking positions costs about 2% of the planning budget.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zarr

from unetflow.demo import synthesize_nuclei
from unetflow.files import atomic_path, write_json_atomic
from unetflow.ome import multiscales_and_version, omero_channel_names, open_image, spatial_axes

__all__ = [
    "Position",
    "PositionError",
    "PositionSet",
    "check_positions",
    "clean_plate_path",
    "collection_positions",
    "collection_tiffs",
    "dataset_positions",
    "parse_well",
    "plate_layout",
    "plate_positions",
    "position_batches",
    "position_output_path",
    "positions_digest",
    "read_positions",
    "spatial_shape",
    "tiff_conversions",
    "well_name",
    "write_demo_plate",
    "write_positions",
]

POSITIONS_FORMAT = "unetflow-positions-1"
IMAGE_SUFFIXES = (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", ".tiff", ".tif")
DEMO_LABELS = "nuclei"
DEMO_PIXEL_SIZE_UM = {"z": 1.0, "y": 0.325, "x": 0.325}


class PositionError(ValueError):
    """A dataset's positions cannot be read, selected, or do not agree with each other."""


@dataclass(frozen=True)
class Position:
    """One image of a dataset: a field of a plate well, or one image of a collection.

    `image` is the path of the field's (or image's) OME-Zarr group. `row`, `column` (the
    plate's names for them) and `field` (index in the well's image list) are None outside
    plates. Plain fields only, so `dataclasses.asdict` gives Snakemake-friendly params.
    """

    key: str
    image: str
    row: str | None = None
    column: str | None = None
    field: int | None = None
    target: str | None = None  # the position's target image (a label image or a twin's field)

    @property
    def well(self) -> str | None:
        """The well's name as users write it (``B03``); None outside plates."""
        if self.row is None or self.column is None:
            return None
        return well_name(self.row, self.column)


# --- well names --------------------------------------------------------------------------

def well_name(row: str, column: str) -> str:
    """The canonical, path-safe name of a well: ``B03`` for row ``B`` and column ``3``.

    Zero-padding the column makes names sort as screeners read plates (B02 before B10).
    """
    if row.isalpha() and column.isdigit():
        return f"{row}{int(column):02d}"
    return f"{row}-{column}"


_WELL_FORMS = (re.compile(r"^([A-Za-z]+)(\d+)$"), re.compile(r"^([^/]+)/([^/]+)$"),
               re.compile(r"^([^-]+)-([^-]+)$"))


def parse_well(text: str) -> tuple[str, str]:
    """(row, column) of a user's well name: ``B03``, ``B3``, ``B/3``, ``B/03`` or ``r1-c2``."""
    for form in _WELL_FORMS:
        match = form.match(str(text).strip())
        if match:
            return match.group(1), match.group(2)
    raise PositionError(f"{text!r} is not a well name; write wells as B03, B3 or B/3 "
                        f"(row name, then column name)")


def _well_lookup_name(row: str, column: str) -> str:
    """Case-insensitive rows: users write b03 as often as B03."""
    return well_name(row.upper(), column)


# --- reading plates ----------------------------------------------------------------------

def _open_group(path: str) -> zarr.Group:
    if not Path(path).exists():
        raise PositionError(f"{path}: no such file or directory; fix the path (a relative "
                            f"path starts in the working directory {Path.cwd()})")
    try:
        return zarr.open_group(path, mode="r")
    except Exception as err:  # zarr raises several types for non-zarr folders
        raise PositionError(f"{path}: not a Zarr group ({err.__class__.__name__}); give the "
                            f"root of an NGFF HCS plate (0.4 or 0.5)") from err


def _ome(attrs: dict[str, Any]) -> dict[str, Any]:
    """The NGFF attributes: under ``ome`` in 0.5, at the top level in 0.4."""
    return attrs["ome"] if isinstance(attrs.get("ome"), dict) else attrs


def _plate_metadata(path: str) -> tuple[zarr.Group, dict[str, Any]]:
    group = _open_group(path)
    meta = _ome(group.attrs.asdict())
    if isinstance(meta.get("plate"), dict):
        return group, meta["plate"]
    if "multiscales" in meta:
        what = "an OME-Zarr image, not an HCS plate; give it as a single image"
    elif "well" in meta:
        what = (f"a well of a plate, not the plate; give the plate's root "
                f"{Path(path).parent.parent}")
    else:
        what = "not an HCS plate (no 'plate' in its attributes)"
    raise PositionError(f"{path}: {what}, or the root of an NGFF HCS plate (0.4 or 0.5)")


def _plate_wells(path: str, plate: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(canonical name, row, column) of every well, sorted by row then column index.

    The well's path in the plate is ``<row>/<column>`` by the NGFF spec.
    """
    rows = [r["name"] for r in plate.get("rows", [])]
    columns = [c["name"] for c in plate.get("columns", [])]
    wells, seen = [], {}
    for well in plate.get("wells", []):
        if str(well.get("path", "")).count("/") != 1:
            raise PositionError(f"{path}: well path {well.get('path')!r} is not <row>/<column>")
        row, column = str(well["path"]).split("/")
        name = _well_lookup_name(row, column)
        if name in seen:
            raise PositionError(f"{path}: wells {seen[name]} and {well['path']} have the same "
                                f"name {name}; rename one of the plate's rows or columns")
        seen[name] = well["path"]
        order = (well.get("rowIndex", _index(rows, row)), well.get("columnIndex",
                                                                   _index(columns, column)))
        wells.append((order, name, row, column))
    return [(name, row, column) for _, name, row, column in sorted(wells)]


def _index(names: list[str], name: str) -> int:
    return names.index(name) if name in names else len(names)


def _summary(names: Sequence[str], limit: int = 12) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join([*names[: limit - 2], "...", names[-1]])


def _select_wells(path: str, wells: list[tuple[str, str, str]],
                  selection: Iterable[str] | None) -> list[tuple[str, str, str]]:
    """The selected wells in plate order; a name that is not in the plate is refused."""
    if selection is None:
        return wells
    by_name = {well[0]: well for well in wells}
    wanted = set()
    for text in selection:
        name = _well_lookup_name(*parse_well(text))
        if name not in by_name:
            raise PositionError(f"{path}: well {text} does not exist; the plate has "
                                f"{len(wells)} wells: {_summary([w[0] for w in wells])}")
        wanted.add(name)
    return [well for well in wells if well[0] in wanted]


def _well_images(path: str, group: zarr.Group, row: str, column: str) -> list[str]:
    well_path = f"{row}/{column}"
    try:
        meta = _ome(group[well_path].attrs.asdict())
    except KeyError:
        meta = {}
    images = (meta.get("well") or {}).get("images")
    if not images:
        raise PositionError(f"{path}/{well_path}: the plate lists this well but it has no "
                            f"well metadata (no 'well' images in its attributes)")
    return [str(image["path"]) for image in images]


def _select_fields(well_path: str, count: int, fields: Iterable[int] | None) -> list[int]:
    if fields is None:
        return list(range(count))
    chosen = sorted(set(fields))
    missing = [f for f in chosen if not 0 <= f < count]
    if missing:
        raise PositionError(f"{well_path}: field {missing[0]} does not exist; the well has "
                            f"{count} field(s), 0-{count - 1}")
    return chosen


def plate_positions(path: str | Path, wells: Iterable[str] | None = None,
                    fields: Iterable[int] | None = None) -> list[Position]:
    """The positions of an NGFF HCS plate (0.4 or 0.5), optionally narrowed.

    `wells` are names such as ``B03``, ``B3`` or ``B/3``; `fields` are indices into each
    well's list of images (the same indices in every selected well). Positions come in plate
    order (row, column, field), whatever the order of the selection. Only metadata is read:
    the fields themselves are opened by `check_positions`.
    """
    path = str(path).rstrip("/") or "/"
    group, plate = _plate_metadata(path)
    fields = None if fields is None else list(fields)
    positions = []
    for name, row, column in _select_wells(path, _plate_wells(path, plate), wells):
        images = _well_images(path, group, row, column)
        for index in _select_fields(f"{path}/{row}/{column}", len(images), fields):
            positions.append(Position(key=f"{name}_{index}",
                                      image=f"{path}/{row}/{column}/{images[index]}",
                                      row=row, column=column, field=index))
    if not positions:
        raise PositionError(f"{path}: no positions (the plate lists no wells, or the selection "
                            f"is empty); select at least one well and field")
    return positions


# --- collections -------------------------------------------------------------------------

def _fixed_prefix(pattern: str) -> Path:
    """The directories of `pattern` before its first wildcard (at most all but the last)."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path()


def _collection_key(relative: Path) -> str:
    name = relative.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    parts = [*relative.parent.parts, name] if relative.parent != Path() else [name]
    key = "__".join(re.sub(r"[^A-Za-z0-9._-]", "_", p) for p in parts)
    return "_" + key[1:] if key.startswith((".", "-")) else key


def collection_positions(pattern: str | Path) -> list[Position]:
    """The images matched by a glob (``**`` recurses), one position each, sorted by key.

    Keys come from the path relative to the glob's fixed prefix, so moving the whole folder
    keeps them; two images that would get the same key are refused rather than merged.
    Hidden names are not matched (unless the pattern says so), so the dot-named temporaries
    of writers still at work (`files.atomic_path`) never become positions. TIFFs get keys
    too, but `check_positions` opens OME-Zarr only: convert them first.
    """
    pattern = str(pattern)
    matches = sorted(glob.glob(pattern, recursive=True))
    if not matches:
        raise PositionError(f"{pattern}: the glob matches nothing; check the folder and the "
                            f"pattern (e.g. data/screen/*.ome.zarr; ** matches any folders)")
    prefix = _fixed_prefix(pattern)
    by_key: dict[str, str] = {}
    for match in matches:
        key = _collection_key(Path(match).relative_to(prefix))
        if key in by_key:
            raise PositionError(f"{match}: gives the same position key {key!r} as "
                                f"{by_key[key]}; rename one of them")
        by_key[key] = match
    return [Position(key=key, image=by_key[key]) for key in sorted(by_key)]


# --- checking ----------------------------------------------------------------------------

class _Layout(NamedTuple):
    """What `check_positions` compares, read from an image's metadata."""

    axes: list[str]
    channel_names: list[str]
    spatial_shape: tuple[int, ...]

    def described(self) -> dict[str, str]:
        """What must agree across positions, in the order a difference is reported."""
        spatial = spatial_axes(self.axes)
        return {"dimensionality": f"{len(spatial)}D ({', '.join(spatial)})",
                "axes": ", ".join(self.axes),
                "channels": f"{len(self.channel_names)} channel(s) {self.channel_names}"}


def _metadata_layout(path: str) -> _Layout | None:
    """The layout from the JSON documents of a local zarr v3 or v2 image; None if unusual.

    `ome.open_image` costs 2-4 ms per image here (zarr's event loop, dask's tokenizing);
    reading two small JSON files costs 0.1 ms, and planning opens every position.
    The metadata is interpreted by `ome`'s own helpers, so both readers agree.
    """
    root = Path(path)
    try:
        v3 = (root / "zarr.json").is_file()
        group = json.loads((root / ("zarr.json" if v3 else ".zattrs")).read_text())
        multiscales, _, meta = multiscales_and_version(group.get("attributes", {}) if v3
                                                        else group)
        axes = [a["name"] if isinstance(a, dict) else str(a) for a in multiscales[0]["axes"]]
        level = multiscales[0]["datasets"][0]["path"]
        array = json.loads((root / level / ("zarr.json" if v3 else ".zarray")).read_text())
        shape = [int(n) for n in array["shape"]]
    except (OSError, ValueError, LookupError, TypeError, AttributeError):
        return None
    if len(shape) != len(axes):
        return None
    channels = omero_channel_names(meta, shape[axes.index("c")] if "c" in axes else 1)
    return _Layout(axes, channels, tuple(n for n, a in zip(shape, axes, strict=True)
                                         if a in spatial_axes(axes)))


def _layout(path: str) -> _Layout:
    """The image's layout; anything unusual goes through `ome.open_image` and its errors."""
    layout = _metadata_layout(path)
    if layout is None:
        image = open_image(path)
        layout = _Layout(image.axes, image.channel_names, image.spatial_shape)
    return layout


def spatial_shape(path: str) -> tuple[int, ...]:
    """An image's spatial shape from its metadata (0.1 ms for a local store, no dask)."""
    return _layout(path).spatial_shape


def _difference(position: Position, layout: _Layout, first: Position,
                first_layout: _Layout) -> str | None:
    theirs = first_layout.described()
    for what, value in layout.described().items():
        if value != theirs[what]:
            return (f"{position.image}: position {position.key} has {what} {value}, but "
                    f"position {first.key} ({first.image}) has {theirs[what]}; all "
                    f"positions of a dataset need the same channels, axes and dimensionality")
    return None


def _label_names(image_path: str) -> list[str]:
    try:
        meta = _ome(zarr.open_group(f"{image_path}/labels", mode="r").attrs.asdict())
    except Exception:  # no labels group at all
        return []
    return [str(n) for n in meta.get("labels", [])]


def _check_labels(position: Position, layout: _Layout, name: str) -> None:
    path = f"{position.image}/labels/{name}"
    if not Path(path).exists():
        found = _label_names(position.image)
        raise PositionError(f"{position.image}: field {position.key} has no label image "
                            f"{name!r} (labels/{name}); its labels are {found or 'none'}")
    labels = _layout(path)
    if labels.spatial_shape != layout.spatial_shape:
        raise PositionError(f"{path}: label image of {position.key} has shape "
                            f"{labels.spatial_shape}, but its field has {layout.spatial_shape}")


def check_positions(positions: Sequence[Position], labels: str | None = None) -> None:
    """Check that every position is an image and that they all agree, reading metadata only.

    Channels (count and names: a channel chosen by name must be the same channel
    everywhere), axes and dimensionality must be those of the first position; with `labels`,
    every position must hold the label image ``labels/<labels>`` of its own spatial shape.
    Raises PositionError (or OmeZarrError from `ome.open_image`) naming the path.
    """
    first: tuple[Position, _Layout] | None = None
    for position in positions:
        layout = _layout(position.image)
        if first is None:
            first = (position, layout)
        elif message := _difference(position, layout, *first):
            raise PositionError(message)
        if labels is not None:
            _check_labels(position, layout, labels)


# --- datasets of positions ---------------------------------------------------------------

@dataclass(frozen=True)
class PositionSet:
    """A dataset made of positions: what every stage of a plate or collection reads.

    Written once per dataset by `write_positions` (rule `positions`), so that jobs get the
    positions from one small file instead of thousands of paths on their command lines.
    `plate` is the source plate's layout (`plate_layout`) for writing an output plate with
    the same rows and columns; `target` says where the targets come from.
    """

    dataset: str
    kind: str  # "plate" or "collection"
    source: str  # the plate's path, or the glob
    positions: tuple[Position, ...]
    plate: dict[str, Any] | None = None
    target: dict[str, Any] | None = None  # {"kind": labels|plate|collection, "source", "labels"}
    normalize: str = "dataset"  # statistics per "dataset" or per "position"

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.positions]

    def by_key(self, key: str) -> Position:
        for position in self.positions:
            if position.key == key:
                return position
        raise PositionError(f"dataset '{self.dataset}' has no position {key!r}; its positions "
                            f"are {_summary(self.keys)}")

    def select(self, keys: Iterable[str]) -> PositionSet:
        """The positions named by `keys`, in the dataset's order."""
        wanted = list(keys)
        known = set(self.keys)
        unknown = [k for k in wanted if k not in known]
        if unknown:
            self.by_key(unknown[0])
        chosen = set(wanted)
        return replace(self, positions=tuple(p for p in self.positions if p.key in chosen))


def plate_layout(path: str | Path) -> dict[str, Any]:
    """The plate's name, rows and columns (names, in the plate's order)."""
    _, plate = _plate_metadata(str(path).rstrip("/"))
    return {"name": plate.get("name"), "rows": [r["name"] for r in plate.get("rows", [])],
            "columns": [c["name"] for c in plate.get("columns", [])]}


def _twin_targets(positions: list[Position], twins: list[Position], source: str,
                  what: str) -> list[Position]:
    """Each position's target: the twin plate's / collection's position of the same key."""
    by_key = {t.key: t for t in twins}
    missing = [p.key for p in positions if p.key not in by_key]
    if missing:
        raise PositionError(f"{source}: the target {what} has no position "
                            f"{_summary(missing)} (of {len(positions)}); it needs every "
                            f"selected position of the image {what}")
    return [replace(p, target=by_key[p.key].image) for p in positions]


def _check_twin_shapes(positions: list[Position]) -> None:
    for position in positions:
        image, target = _layout(position.image), _layout(position.target)
        if image.spatial_shape != target.spatial_shape:
            raise PositionError(f"{position.target}: target of position {position.key} has "
                                f"spatial shape {target.spatial_shape}, but its image "
                                f"{position.image} has {image.spatial_shape}")


def _targets(positions: list[Position], kind: str, spec: dict[str, Any]
             ) -> tuple[list[Position], dict[str, Any] | None]:
    if spec.get("labels"):
        name = spec["labels"]
        return ([replace(p, target=f"{p.image}/labels/{name}") for p in positions],
                {"kind": "labels", "source": None, "labels": name})
    if not spec.get("target"):
        return positions, None
    source = str(spec["target"])
    twins = plate_positions(source) if kind == "plate" else collection_positions(source)
    return (_twin_targets(positions, twins, source, kind),
            {"kind": kind, "source": source, "labels": None})


def is_tiff(path: str | None) -> bool:
    return bool(path) and str(path).lower().endswith((".tif", ".tiff"))


def tiff_conversions(positions: Sequence[Position], root: str | Path
                     ) -> list[tuple[str, str, str]]:
    """(TIFF, OME-Zarr conversion, role) of every TIFF image and target of a collection:
    the conversion of key k's image is ``<root>/image/<k>.ome.zarr``."""
    pairs = []
    for p in positions:
        for role, path in (("image", p.image), ("target", p.target)):
            if is_tiff(path):
                pairs.append((path, f"{root}/{role}/{p.key}.ome.zarr", role))
    return pairs


def _use_conversions(positions: list[Position], root: str) -> list[Position]:
    converted = {(role, tiff): out for tiff, out, role in tiff_conversions(positions, root)}
    return [replace(p, image=converted.get(("image", p.image), p.image),
                    target=converted.get(("target", p.target), p.target)) for p in positions]


def dataset_positions(name: str, spec: dict[str, Any], check: bool = True,
                      converted: str | None = None) -> PositionSet:
    """The positions of a configured plate or collection dataset, with their targets.

    `spec` is the dataset's validated config entry (`plate` with optional `wells` and
    `fields`, or `collection`; `labels` or `target`). With `check`, reads every position's
    metadata (`check_positions`, and the targets' shapes): about 0.4 s per 1,000 positions.
    A collection's TIFFs are read from their conversions under `<converted>/<name>`
    (`tiff_conversions`); while those do not exist yet, nothing is checked.
    Errors are PositionErrors that start with the dataset's config key.
    """
    kind = "plate" if spec.get("plate") else "collection"
    try:
        source, positions, layout, target = _listed_positions(kind, spec)
        if converted and kind == "collection" and tiff_conversions(positions, ""):
            positions = _use_conversions(positions, f"{converted}/{name}")
            check = check and all(Path(p.image).exists() for p in positions)
        elif tiff_conversions(positions, ""):
            raise PositionError(f"{source}: matches TIFF files; the workflow converts them "
                                f"to OME-Zarr first (rule convert_collection)")
        if check:
            check_positions(positions, labels=spec.get("labels"))
            if target is not None and target["kind"] != "labels":
                _check_twin_shapes(positions)
    except ValueError as err:  # PositionError, and OmeZarrError from ome.open_image
        raise PositionError(f"dataset '{name}' (datasets.{name}): {err}") from None
    return PositionSet(name, kind, source, tuple(positions), layout, target,
                       spec.get("normalize") or "dataset")


def _listed_positions(kind: str, spec: dict[str, Any]
                      ) -> tuple[str, list[Position], dict | None, dict | None]:
    """(source, positions with their targets, plate layout, target) as listed: no checks."""
    if kind == "plate":
        source = str(spec["plate"]).rstrip("/")
        positions = plate_positions(source, spec.get("wells"), spec.get("fields"))
        layout = plate_layout(source)
    else:
        source = str(spec["collection"])
        positions, layout = collection_positions(source), None
    positions, target = _targets(positions, kind, spec)
    return source, positions, layout, target


def collection_tiffs(name: str, spec: dict[str, Any], root: str | Path
                     ) -> list[tuple[str, str, str]]:
    """`tiff_conversions` of a collection dataset into `<root>` (rule convert_collection)."""
    try:
        return tiff_conversions(_listed_positions("collection", spec)[1], root)
    except ValueError as err:
        raise PositionError(f"dataset '{name}' (datasets.{name}): {err}") from None


def write_positions(positions: PositionSet, path: str | Path) -> None:
    """The positions file (JSON, atomically): what the jobs of a plate dataset read."""
    document = {"format": POSITIONS_FORMAT, "dataset": positions.dataset,
                "kind": positions.kind, "source": positions.source, "plate": positions.plate,
                "target": positions.target, "normalize": positions.normalize,
                "positions": [asdict(p) for p in positions.positions]}
    write_json_atomic(document, path)


def positions_digest(positions: PositionSet) -> str:
    """A short digest of which positions there are and where their images and targets are:
    a param of rule positions, so that a plate gaining fields reruns it."""
    import hashlib

    listed = [(p.key, p.image, p.target) for p in positions.positions]
    return hashlib.sha256(json.dumps(listed).encode()).hexdigest()[:16]


def read_positions(path: str | Path, keys: Iterable[str] | None = None) -> PositionSet:
    """A positions file, optionally narrowed to `keys` (a job's batch)."""
    try:
        with open(path) as fh:
            document = json.load(fh)
        if document.get("format") != POSITIONS_FORMAT:
            raise ValueError(f"format {document.get('format')!r}, not {POSITIONS_FORMAT}")
        positions = PositionSet(document["dataset"], document["kind"], document["source"],
                                tuple(Position(**p) for p in document["positions"]),
                                document.get("plate"), document.get("target"),
                                document.get("normalize", "dataset"))
    except (ValueError, KeyError, TypeError) as err:
        raise PositionError(f"{path}: not a positions file ({err}); rerun rule positions "
                            f"(delete the file)") from None
    return positions if keys is None else positions.select(keys)


def position_output_path(root: str | Path, kind: str, position: Position) -> str:
    """Where a position's output image goes: the same well and field in an output plate,
    or ``<root>/<key>.ome.zarr`` for a collection."""
    root = str(root).rstrip("/")
    if kind == "plate":
        return f"{root}/{position.row}/{position.column}/{position.field}"
    return f"{root}/{position.key}.ome.zarr"


def position_batches(keys: Sequence[str], per_job: int) -> list[list[str]]:
    """`keys` cut into max(1, n // per_job) contiguous batches whose sizes differ by at most 1.

    So every batch holds at least `per_job` positions (fewer only when the dataset has
    fewer) and less than twice as many: a 384-well x 9-field plate with the default 100 is
    34 jobs of 101-102 positions, at most one job per 100 positions. Contiguous in plate
    order, so a batch is a few neighbouring wells: its job reads neighbouring folders, and a
    rerun after a failure redoes one block of the plate.
    """
    if per_job < 1:
        raise ValueError(f"positions per job must be at least 1, got {per_job}")
    if not keys:
        return []
    count = max(1, len(keys) // per_job)
    bounds = np.linspace(0, len(keys), count + 1).round().astype(int)
    return [list(keys[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


# --- the demo plate ----------------------------------------------------------------------

def clean_plate_path(path: str | Path) -> str:
    """Where `write_demo_plate` puts the noise-free plate: x.ome.zarr -> x_clean.ome.zarr."""
    path = Path(path)
    name = path.name
    stem = name[: -len(".ome.zarr")] if name.endswith(".ome.zarr") else path.stem
    return str(path.with_name(f"{stem}_clean.ome.zarr"))


def _row_name(index: int) -> str:
    """A, B, ..., Z, AA, AB, ... (1536-well plates have 32 rows)."""
    name = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        name = chr(ord("A") + rest) + name
    return name


def _format(ngff: str) -> Any:
    from ome_zarr.format import FormatV04, FormatV05

    if ngff not in ("0.4", "0.5"):
        raise ValueError(f"ngff must be '0.4' or '0.5', got {ngff!r}")
    return FormatV04() if ngff == "0.4" else FormatV05()


def _set_ngff(group: zarr.Group, ngff: str, key: str, value: Any) -> None:
    """Add one NGFF attribute where the version keeps it (``ome`` in 0.5)."""
    if ngff == "0.5":
        group.attrs["ome"] = {**group.attrs.asdict().get("ome", {}), key: value}
    else:
        group.attrs[key] = value


def _write_field(group: zarr.Group, data: np.ndarray, labels: np.ndarray | None,
                 ngff: str) -> None:
    """One field: a 2-level multiscale image (c, *spatial), and its labels/nuclei."""
    from ome_zarr.scale import Methods
    from ome_zarr.writer import write_image, write_labels

    spatial = "zyx"[-data.ndim:]
    factors = [{a: (1 if a == "z" else 2) for a in spatial}]
    units = {a: "micrometer" for a in spatial}
    scale = {a: DEMO_PIXEL_SIZE_UM[a] for a in spatial}
    fmt = _format(ngff)
    write_image(data[None], group, scale_factors=factors, fmt=fmt, axes="c" + spatial,
                scale={"c": 1.0, **scale}, axes_units=units,
                storage_options={"chunks": (1, *[min(s, 256) for s in data.shape])})
    low, high = float(data.min()), float(data.max())
    window = {"start": low, "end": high, "min": low, "max": high}  # 0.4 validators need it
    _set_ngff(group, ngff, "omero", {"channels": [{"label": DEMO_LABELS, "active": True,
                                                   "color": "FFFFFF", "window": window}]})
    if labels is None:
        return
    write_labels(labels, group, name=DEMO_LABELS, scaler=None, scale_factors=factors,
                 method=Methods.NEAREST, fmt=fmt, axes=spatial, scale=scale, axes_units=units,
                 label_metadata={"source": {"image": "../../"}})
    if ngff == "0.5":  # ome-zarr-py leaves out the version that validators require
        group["labels"].attrs["ome"] = {"version": "0.5", "labels": [DEMO_LABELS]}


def _write_plate(path: str | Path, layout: list[tuple[str, str, str]], fields: int,
                 images: list[list[tuple[np.ndarray, np.ndarray | None]]], ngff: str,
                 kind: str, seed: int) -> None:
    from ome_zarr.writer import write_plate_metadata, write_well_metadata

    fmt = _format(ngff)
    rows = list(dict.fromkeys(row for _, row, _ in layout))
    columns = list(dict.fromkeys(column for _, _, column in layout))
    with atomic_path(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=2 if ngff == "0.4" else 3)
        write_plate_metadata(root, rows, columns, [f"{r}/{c}" for _, r, c in layout],
                             fmt=fmt, field_count=fields, name=f"unetflow demo ({kind})")
        root.attrs["unetflow"] = {"demo": {"seed": seed, "kind": kind}}
        for (_, row, column), well_images in zip(layout, images, strict=True):
            well = root.require_group(f"{row}/{column}")
            write_well_metadata(well, [str(f) for f in range(fields)], fmt=fmt)
            for index, (data, labels) in enumerate(well_images):
                _write_field(well.require_group(str(index)), data, labels, ngff)


def write_demo_plate(path: str | Path, rows: int = 2, columns: int = 3, fields: int = 2,
                     shape: tuple[int, ...] = (64, 64), seed: int = 0, ngff: str = "0.5",
                     labels: bool = True, clean: bool = True) -> list[str]:
    """Write a synthetic HCS plate of nuclei with ome-zarr-py; return its position keys.

    Rows are named A, B, ..., columns 1, 2, ...; each field is a noisy (c=1, *shape) image
    from `demo.synthesize_nuclei`, seeded from (`seed`, position index), so the plate is
    the same bit for bit every time. With `labels`, each field holds its instance labels as
    the NGFF label image ``labels/nuclei`` (the segmentation target). With `clean`, the
    noise-free images go into a second plate with the same positions at
    `clean_plate_path(path)` (the denoising target): NGFF labels must be integer, and a
    field has no standard place for a second intensity image. Both plates are written
    atomically; NGFF 0.5 on zarr v3, or ``ngff="0.4"`` on zarr v2.
    """
    _format(ngff)
    layout = [(well_name(_row_name(r), str(c + 1)), _row_name(r), str(c + 1))
              for r in range(rows) for c in range(columns)]
    scenes = [[synthesize_nuclei(tuple(shape), _field_seed(seed, w * fields + f))
               for f in range(fields)] for w in range(len(layout))]
    noisy = [[(s.noisy, s.labels if labels else None) for s in well] for well in scenes]
    _write_plate(path, layout, fields, noisy, ngff, "image", seed)
    if clean:
        noise_free = [[(s.clean, None) for s in well] for well in scenes]
        _write_plate(clean_plate_path(path), layout, fields, noise_free, ngff, "clean", seed)
    return [f"{name}_{f}" for name, _, _ in layout for f in range(fields)]


def _field_seed(seed: int, index: int) -> int:
    """Independent, reproducible seeds per field (not seed + index, which overlaps demos)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
