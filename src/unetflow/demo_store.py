"""Writing the synthetic demo scenes as OME-Zarr stores that the demo config points to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unetflow.demo import synthesize_nuclei
from unetflow.ome import PlannedImage, write_image

__all__ = ["DEMO_SCENES", "demo_store_paths", "planned_demo_images", "write_demo_data"]

# scene name -> (which shape setting, seed offset)
DEMO_SCENES = {"train_2d": ("shape_2d", 0), "test_2d": ("shape_2d", 1), "stack_3d": ("shape_3d", 2)}
DEMO_KINDS = ("image", "labels", "clean")
DEMO_DTYPES = {"image": "float32", "clean": "float32", "labels": "uint16"}  # synthesize_nuclei
DEMO_LEVELS = 2


def demo_store_paths(root: str | Path) -> dict[str, str]:
    """`<scene>_<kind>` -> store path, e.g. train_2d_image -> data/demo/train_2d/image.ome.zarr."""
    return {f"{scene}_{kind}": str(Path(root) / scene / f"{kind}.ome.zarr")
            for scene in DEMO_SCENES for kind in DEMO_KINDS}


def planned_demo_images(root: str | Path, settings: dict[str, Any]) -> dict[str, PlannedImage]:
    """Store path -> what rule demo_data will write there (shape, dtype, scale, levels),
    from the `demo` settings alone, so planning checks the demo data before it exists."""
    planned = {}
    for scene, (shape_key, _) in DEMO_SCENES.items():
        shape = tuple(int(n) for n in settings[shape_key])
        spatial = ["z", "y", "x"][-len(shape):]
        size = {"y": settings["pixel_size_um"], "x": settings["pixel_size_um"],
                "z": settings["z_step_um"]}
        for kind in DEMO_KINDS:
            path = str(Path(root) / scene / f"{kind}.ome.zarr")
            planned[path] = PlannedImage(
                path=path, axes=("c", *spatial), shape=(1, *shape), dtype=DEMO_DTYPES[kind],
                scale=(1.0, *[float(size[a]) for a in spatial]), levels=DEMO_LEVELS,
                channel_names=("nuclei",))
    return planned


def _write_scene(root: Path, scene: str, shape: tuple[int, ...], seed: int,
                 settings: dict[str, Any]) -> None:
    result = synthesize_nuclei(shape, seed)
    spatial = ["z", "y", "x"][-len(shape):]
    size = {"y": settings["pixel_size_um"], "x": settings["pixel_size_um"],
            "z": settings["z_step_um"]}
    scale = {"c": 1.0, **{a: size[a] for a in spatial}}
    units = {a: "micrometer" for a in spatial}
    chunks = (1, *[min(s, 256) for s in shape])
    for kind, array in (("image", result.noisy), ("clean", result.clean),
                        ("labels", result.labels)):
        write_image(root / scene / f"{kind}.ome.zarr", array[None], ["c", *spatial],
                    scale=scale, units=units, pyramid_levels=DEMO_LEVELS, chunks=chunks,
                    attrs={"demo": {"scene": scene, "seed": seed, "kind": kind}},
                    channel_names=["nuclei"])


def write_demo_data(root: str | Path, settings: dict[str, Any]) -> dict[str, str]:
    """Generate every demo scene deterministically from `settings['seed']`."""
    root = Path(root)
    for scene, (shape_key, offset) in DEMO_SCENES.items():
        _write_scene(root, scene, tuple(settings[shape_key]), settings["seed"] + offset, settings)
    return demo_store_paths(root)
