"""Tests for unetflow.plates on real stores: the demo plate in NGFF 0.5 and 0.4 validates and
opens as a plate, its positions read back with their labels, selections and collections give
stable keys, and every kind of bad input is refused with one line naming the path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from unetflow.demo import synthesize_nuclei
from unetflow.ome import OmeZarrError, open_image, write_image, write_label_image
from unetflow.plates import (
    Position,
    PositionError,
    _field_seed,
    _Layout,
    _metadata_layout,
    check_positions,
    clean_plate_path,
    collection_positions,
    parse_well,
    plate_positions,
    well_name,
    write_demo_plate,
)

SHAPE = (64, 64)
SEED = 5
ALL_KEYS = [f"{r}0{c}_{f}" for r in "AB" for c in (1, 2, 3) for f in (0, 1)]


@pytest.fixture(scope="module", params=["0.5", "0.4"])
def plate(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo plate of 2 rows x 3 columns x 2 fields (and its clean twin), per NGFF version."""
    path = tmp_path_factory.mktemp(f"ngff{request.param}") / "plate.ome.zarr"
    keys = write_demo_plate(path, rows=2, columns=3, fields=2, shape=SHAPE, seed=SEED,
                            ngff=request.param)
    assert keys == ALL_KEYS
    return path


def one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


# --- writing and reading back ------------------------------------------------------------

def test_plate_validates_and_opens_as_a_plate(plate: Path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Plate, Reader
    from ome_zarr_models import open_ome_zarr
    from ome_zarr_models.v04.hcs import HCS as HCSv04
    from ome_zarr_models.v05.hcs import HCS as HCSv05

    version = zarr.open_group(str(plate), mode="r").attrs.get("ome", {}).get("version", "0.4")
    for path in (plate, clean_plate_path(plate)):
        model = open_ome_zarr(zarr.open_group(str(path), mode="r"))
        assert isinstance(model, HCSv05 if version == "0.5" else HCSv04)
        nodes = list(Reader(parse_url(str(path)))())
        assert any(isinstance(spec, Plate) for spec in nodes[0].specs)


def test_positions_open_with_their_labels(plate: Path) -> None:
    positions = plate_positions(plate)
    assert [p.key for p in positions] == ALL_KEYS
    assert positions[-1] == Position("B03_1", f"{plate}/B/3/1", "B", "3", 1)
    assert positions[-1].well == "B03"
    for position in positions:
        image = open_image(position.image)
        assert image.axes == ["c", "y", "x"] and image.data.shape == (1, *SHAPE)
        assert image.channel_names == ["nuclei"]
        labels = open_image(f"{position.image}/labels/nuclei")
        assert labels.spatial_shape == SHAPE and labels.data.dtype.kind == "u"
    check_positions(positions, labels="nuclei")
    clean = plate_positions(clean_plate_path(plate))
    assert [p.key for p in clean] == ALL_KEYS
    check_positions(clean)


def test_metadata_reader_agrees_with_open_image(plate: Path) -> None:
    """check_positions reads JSON for speed; it must see what ome.open_image sees."""
    for position in plate_positions(plate)[:3]:
        for path in (position.image, f"{position.image}/labels/nuclei"):
            image = open_image(path)
            assert _metadata_layout(path) == _Layout(image.axes, image.channel_names,
                                                     image.spatial_shape)


def test_fields_are_synthesize_nuclei_of_their_own_seed(plate: Path) -> None:
    """Oracle: the stored arrays are exactly demo.synthesize_nuclei's, one seed per field."""
    index = ALL_KEYS.index("B02_1")
    scene = synthesize_nuclei(SHAPE, _field_seed(SEED, index))
    field = plate_positions(plate, wells=["B02"], fields=[1])[0].image
    np.testing.assert_array_equal(open_image(field).data[0].compute(), scene.noisy)
    np.testing.assert_array_equal(open_image(f"{field}/labels/nuclei").data.compute(),
                                  scene.labels)
    clean = plate_positions(clean_plate_path(plate), wells=["B02"], fields=[1])[0].image
    np.testing.assert_array_equal(open_image(clean).data[0].compute(), scene.clean)
    other = synthesize_nuclei(SHAPE, _field_seed(SEED, index - 1))
    assert not np.array_equal(other.labels, scene.labels)


def test_selection_keeps_plate_order_and_keys(plate: Path) -> None:
    chosen = plate_positions(plate, wells=["b3", "A/1", "B02", "B/02"], fields=[1])
    assert [p.key for p in chosen] == ["A01_1", "B02_1", "B03_1"]
    assert {p.key: p for p in plate_positions(plate)}["B02_1"] == chosen[1]
    assert [p.key for p in plate_positions(plate, fields=[0])] == ALL_KEYS[::2]
    assert plate_positions(f"{plate}/", wells=["A01"])[0].image == f"{plate}/A/1/0"


def test_well_names() -> None:
    for text in ("B03", "B3", "b03", "B/3", "B/03"):
        row, column = parse_well(text)
        assert well_name(row.upper(), column) == "B03"
    assert well_name("AF", "48") == "AF48" and well_name("r1", "c2") == "r1-c2"
    assert parse_well("r1-c2") == ("r1", "c2")
    with pytest.raises(PositionError, match="not a well name"):
        parse_well("B 3")


# --- collections -------------------------------------------------------------------------

def tiny_image(path: Path, channels: int = 1, spatial: tuple[int, ...] = (32, 32),
               names: list[str] | None = None) -> None:
    data = np.zeros((channels, *spatial), dtype=np.float32)
    write_image(path, data, ["c", *"zyx"[-len(spatial):]], channel_names=names)


def test_collection_keys_from_the_path(tmp_path: Path) -> None:
    for name in ("ctrl/img01.ome.zarr", "ctrl/img 02.ome.zarr", "drug/img01.ome.zarr",
                 "ctrl/.img03.ome.zarr"):  # hidden, as a writer's temporary is: not matched
        tiny_image(tmp_path / "screen" / name)
    positions = collection_positions(f"{tmp_path}/screen/*/*.ome.zarr")
    assert [p.key for p in positions] == ["ctrl__img01", "ctrl__img_02", "drug__img01"]
    assert positions[0] == Position("ctrl__img01", f"{tmp_path}/screen/ctrl/img01.ome.zarr")
    assert [p.key for p in collection_positions(f"{tmp_path}/screen/ctrl/*.ome.zarr")] == [
        "img01", "img_02"]
    assert [p.key for p in collection_positions(f"{tmp_path}/**/img01.ome.zarr")] == [
        "screen__ctrl__img01", "screen__drug__img01"]
    check_positions(positions)


# --- bad input ---------------------------------------------------------------------------

def test_image_or_well_given_as_plate(plate: Path, tmp_path: Path) -> None:
    tiny_image(tmp_path / "image.ome.zarr")
    for path in (tmp_path / "image.ome.zarr", plate / "A" / "2" / "0"):
        with pytest.raises(PositionError) as err:
            plate_positions(path)
        one_line(err, str(path), "an OME-Zarr image, not an HCS plate")
    with pytest.raises(PositionError) as err:
        plate_positions(plate / "A" / "2")
    one_line(err, f"{plate}/A/2", "a well of a plate, not the plate", str(plate))
    with pytest.raises(PositionError) as err:
        plate_positions(tmp_path / "missing.ome.zarr")
    one_line(err, "missing.ome.zarr", "no such file")


def test_missing_well_or_field(plate: Path) -> None:
    with pytest.raises(PositionError) as err:
        plate_positions(plate, wells=["A01", "C02"])
    one_line(err, str(plate), "well C02 does not exist", "A01, A02, A03, B01, B02, B03")
    with pytest.raises(PositionError) as err:
        plate_positions(plate, wells=["B03"], fields=[0, 2])
    one_line(err, f"{plate}/B/3", "field 2 does not exist", "0-1")
    with pytest.raises(PositionError) as err:
        plate_positions(plate, wells=[])
    one_line(err, str(plate), "no positions")


def test_positions_that_differ(tmp_path: Path) -> None:
    tiny_image(tmp_path / "a" / "one.ome.zarr")
    tiny_image(tmp_path / "a" / "two.ome.zarr", channels=2)
    tiny_image(tmp_path / "b" / "one.ome.zarr")
    tiny_image(tmp_path / "b" / "two.ome.zarr", spatial=(32, 32, 32))
    tiny_image(tmp_path / "c" / "one.ome.zarr", names=["dapi"])
    tiny_image(tmp_path / "c" / "two.ome.zarr", names=["gfp"])
    for folder, what in (("a", "channels 2 channel(s)"), ("b", "dimensionality 3D (z, y, x)"),
                         ("c", "channels 1 channel(s) ['gfp']")):
        positions = collection_positions(f"{tmp_path}/{folder}/*.ome.zarr")
        with pytest.raises(PositionError) as err:
            check_positions(positions)
        one_line(err, f"{tmp_path}/{folder}/two.ome.zarr", "position two has", what,
                 f"position one ({tmp_path}/{folder}/one.ome.zarr)")


def test_position_that_is_not_an_image(tmp_path: Path) -> None:
    """Anything unusual falls back to ome.open_image, whose errors name the path."""
    (tmp_path / "folder.ome.zarr").mkdir()
    tiny_image(tmp_path / "good.ome.zarr")
    good = Position("good", str(tmp_path / "good.ome.zarr"))
    for name, what in (("missing.ome.zarr", "no such file"), ("folder.ome.zarr", "not")):
        with pytest.raises(OmeZarrError) as err:
            check_positions([good, Position("bad", str(tmp_path / name))])
        one_line(err, str(tmp_path / name), what)


def test_labels_of_another_shape(tmp_path: Path) -> None:
    tiny_image(tmp_path / "image.ome.zarr")
    write_label_image(tmp_path / "image.ome.zarr", "nuclei", np.zeros((16, 16), np.uint16),
                      ["y", "x"])
    with pytest.raises(PositionError) as err:
        check_positions(collection_positions(f"{tmp_path}/*.ome.zarr"), labels="nuclei")
    one_line(err, f"{tmp_path}/image.ome.zarr/labels/nuclei", "(16, 16)", "(32, 32)")


def test_glob_that_matches_nothing_or_collides(tmp_path: Path) -> None:
    with pytest.raises(PositionError) as err:
        collection_positions(f"{tmp_path}/*.ome.zarr")
    one_line(err, f"{tmp_path}/*.ome.zarr", "matches nothing")
    tiny_image(tmp_path / "a b.ome.zarr")
    tiny_image(tmp_path / "a_b.ome.zarr")
    with pytest.raises(PositionError) as err:
        collection_positions(f"{tmp_path}/*.ome.zarr")
    one_line(err, "a_b.ome.zarr", "a b.ome.zarr", "same position key 'a_b'")


def test_labels_missing_in_one_field(plate: Path, tmp_path: Path) -> None:
    copy = tmp_path / "plate.ome.zarr"
    shutil.copytree(plate, copy)
    positions = plate_positions(copy)
    with pytest.raises(PositionError) as err:
        check_positions(positions, labels="cells")
    one_line(err, f"{copy}/A/1/0", "field A01_0", "'cells'", "['nuclei']")
    shutil.rmtree(copy / "B" / "2" / "1" / "labels" / "nuclei")
    check_positions(positions[:9], labels="nuclei")
    with pytest.raises(PositionError) as err:
        check_positions(positions, labels="nuclei")
    one_line(err, f"{copy}/B/2/1", "field B02_1", "'nuclei'")


def test_clean_plate_has_no_labels(plate: Path) -> None:
    with pytest.raises(PositionError) as err:
        check_positions(plate_positions(clean_plate_path(plate)), labels="nuclei")
    one_line(err, "plate_clean.ome.zarr/A/1/0", "field A01_0", "none")


def test_clean_plate_path() -> None:
    assert clean_plate_path("data/demo/plate.ome.zarr") == "data/demo/plate_clean.ome.zarr"
    assert clean_plate_path("p.zarr") == "p_clean.ome.zarr"


# --- datasets of positions: targets, the positions file, batches ---------------------------

def test_dataset_positions_of_a_plate_with_labels_and_twin_targets(plate: Path) -> None:
    """Labels give each field's labels/<name>; a twin plate gives its field of the same key."""
    from unetflow.plates import dataset_positions

    spec = {"plate": str(plate), "wells": ["B03", "A1"], "fields": [1], "labels": "nuclei"}
    labelled = dataset_positions("screen", spec)
    assert labelled.keys == ["A01_1", "B03_1"]
    assert labelled.positions[1].target == f"{plate}/B/3/1/labels/nuclei"
    assert labelled.plate["rows"] == ["A", "B"] and labelled.plate["columns"] == ["1", "2", "3"]
    twin = dataset_positions("screen", {"plate": str(plate), "target": clean_plate_path(plate)})
    assert len(twin.positions) == 12
    assert twin.by_key("B03_1").target == f"{clean_plate_path(plate)}/B/3/1"
    assert twin.target == {"kind": "plate", "source": clean_plate_path(plate), "labels": None}


def test_dataset_positions_errors_name_the_dataset_key(plate: Path, tmp_path: Path) -> None:
    from unetflow.plates import dataset_positions

    with pytest.raises(PositionError, match=r"^dataset 'screen' \(datasets.screen\): .*well "
                                            r"H12 does not exist"):
        dataset_positions("screen", {"plate": str(plate), "wells": ["H12"]})
    with pytest.raises(PositionError, match=r"datasets.screen.*no label image 'cells'"):
        dataset_positions("screen", {"plate": str(plate), "labels": "cells"})
    smaller = tmp_path / "twin.ome.zarr"
    write_demo_plate(smaller, rows=1, columns=3, fields=2, shape=SHAPE, clean=False,
                     labels=False)
    with pytest.raises(PositionError, match=r"target plate has no position B01_0, .* \(of 12\)"):
        dataset_positions("screen", {"plate": str(plate), "target": str(smaller)})
    with pytest.raises(PositionError, match=r"datasets.folder.*matches nothing"):
        dataset_positions("folder", {"collection": str(tmp_path / "none" / "*.ome.zarr")})


def test_positions_file_round_trip_and_selection(plate: Path, tmp_path: Path) -> None:
    from unetflow.plates import dataset_positions, read_positions, write_positions

    positions = dataset_positions("screen", {"plate": str(plate), "labels": "nuclei",
                                             "normalize": "position"})
    path = tmp_path / "positions.json"
    write_positions(positions, path)
    assert read_positions(path) == positions
    batch = read_positions(path, keys=["B03_1", "A01_0"])
    assert batch.keys == ["A01_0", "B03_1"] and batch.normalize == "position"
    with pytest.raises(PositionError, match="has no position 'Z99_0'"):
        read_positions(path, keys=["Z99_0"])
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(PositionError, match="bad.json: not a positions file"):
        read_positions(tmp_path / "bad.json")


def test_position_batches_are_contiguous_and_balanced() -> None:
    from unetflow.plates import position_batches

    keys = [f"k{i:04d}" for i in range(3456)]
    batches = position_batches(keys, 100)
    assert len(batches) == 34  # at most one job per 100 positions
    assert [k for b in batches for k in b] == keys
    assert {len(b) for b in batches} <= {101, 102}
    assert position_batches(keys[:7], 100) == [keys[:7]]
    assert [len(b) for b in position_batches(keys[:199], 100)] == [199]
    assert [len(b) for b in position_batches(keys[:6], 2)] == [2, 2, 2]
    assert position_batches([], 100) == []
    with pytest.raises(ValueError, match="at least 1"):
        position_batches(keys, 0)


def test_position_output_path() -> None:
    from unetflow.plates import position_output_path

    field = Position("B03_1", "in/B/3/1", "B", "3", 1)
    assert position_output_path("out/p.ome.zarr/", "plate", field) == "out/p.ome.zarr/B/3/1"
    image = Position("ctrl__img01", "in/ctrl/img01.ome.zarr")
    assert position_output_path("out/c", "collection", image) == "out/c/ctrl__img01.ome.zarr"
