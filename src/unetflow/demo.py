"""Deterministic synthetic fluorescence nuclei for demos and tests.

A real microscope image of stained nuclei is hard to ship with a workflow, yet
training, prediction and evaluation all need an image together with its ground
truth. :func:`synthesize_nuclei` draws one from a seed: textured, blurred
nuclei on an uneven background, recorded with shot and read noise, together
with the noise-free scene and the instance labels. It needs only numpy and
``scipy.ndimage`` and touches no files.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from numbers import Real

import numpy as np
from scipy import ndimage

__all__ = ["DemoImage", "synthesize_nuclei"]

MIN_EDGE = 32
DEFAULT_MEAN_RADIUS = {2: 11.0, 3: 6.0}

# Scene: how much of the image the nuclei cover and how they may touch.
FOREGROUND_FRACTION_RANGE = (0.24, 0.30)
CONTACT_FACTOR = 0.8  # centres at least this times the sum of radii apart
MAX_PLACEMENT_TRIES_PER_NUCLEUS = 40

# Nucleus appearance, relative to the nucleus' own brightness.
RADIUS_LOG_SPREAD = 0.18
RADIUS_LOG_LIMIT = 0.35  # radii from 0.70 to 1.42 times the mean
AXIS_LOG_SPREAD = 0.22
BRIGHTNESS_LOG_SPREAD = 0.3
BRIGHTNESS_LOG_LIMITS = (-0.6, 0.3)  # bounded, so the brightest pixel barely grows with image size
EDGE_DIMMING = 0.2
COARSE_TEXTURE_AMPLITUDE = 0.22
FINE_TEXTURE_AMPLITUDE = 0.10
TEXTURE_LIMITS = (0.6, 1.3)
NUCLEOLI_PER_NUCLEUS = 1.5
NUCLEOLUS_AMPLITUDE_RANGE = (0.3, 0.6)
NUCLEOLI_MAX_GAIN = 0.5

# Recording, in photons per pixel.
NUCLEUS_PHOTONS = 15.0
BACKGROUND_PHOTONS_RANGE = (1.5, 4.0)
READ_NOISE_PHOTONS = 1.7
PSF_SIGMA = {2: (1.5, 1.5), 3: (1.3, 0.8, 0.8)}  # (z,) y, x; z blurred more


@dataclass(frozen=True)
class DemoImage:
    """A synthetic recording together with its ground truth.

    Attributes:
        noisy: float32 photon counts as the camera records them (shot noise,
            read noise, background), shape (Y, X) or (Z, Y, X); read noise can
            take dark pixels slightly below zero.
        clean: float32 expected photon counts of the same scene without noise
            (blurred, with background), same shape and units as ``noisy``.
        labels: instance labels 1..n, 0 for background, same shape; uint16,
            or uint32 in the rare image holding more than 65535 nuclei.
    """

    noisy: np.ndarray
    clean: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class _Nucleus:
    """One ellipse or ellipsoid: its axes are the columns of ``rotation``."""

    center: np.ndarray
    rotation: np.ndarray
    semi_axes: np.ndarray
    brightness: float

    @property
    def radius(self) -> float:
        """Radius of the circle or sphere of the same area or volume."""
        return float(np.exp(np.mean(np.log(self.semi_axes))))


def synthesize_nuclei(
    shape: tuple[int, ...], seed: int, mean_radius: float | None = None
) -> DemoImage:
    """Draw a fluorescence image of nuclei with its clean version and labels.

    The same ``shape``, ``seed`` and ``mean_radius`` give the same arrays bit
    for bit, so demos and tests can regenerate their data instead of storing it.

    Args:
        shape: (Y, X) for a 2D image or (Z, Y, X) for a 3D stack, each at
            least 32 pixels.
        seed: seed of the numpy random generator that draws everything.
        mean_radius: typical nucleus radius in pixels; defaults to 11 in 2D
            and 6 in 3D.

    Returns:
        The noisy recording, the noise-free scene and the instance labels.

    Raises:
        ValueError: if ``shape`` or ``mean_radius`` is not usable.
    """
    shape = _validated_shape(shape)
    ndim = len(shape)
    mean_radius = _validated_mean_radius(mean_radius, ndim)
    rng = np.random.default_rng(seed)
    labels, nucleus_photons = _paint_nuclei(rng, shape, mean_radius)
    nucleus_photons *= _texture(rng, shape, mean_radius)
    scene = nucleus_photons + _uneven_background(rng, shape)
    clean = ndimage.gaussian_filter(scene, sigma=PSF_SIGMA[ndim], mode="reflect")
    noisy = _record(rng, clean)
    return DemoImage(noisy=noisy, clean=clean.astype(np.float32), labels=labels)


def _validated_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Accept 2 or 3 integer edges of at least ``MIN_EDGE`` pixels."""
    try:
        edges = tuple(shape)
    except TypeError:
        raise ValueError(f"shape must be a tuple of 2 or 3 ints, got {shape!r}") from None
    is_int = all(isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in edges)
    if len(edges) not in (2, 3) or not is_int or min(edges) < MIN_EDGE:
        raise ValueError(f"shape must be 2 or 3 ints, each at least {MIN_EDGE}, got {shape!r}")
    return tuple(int(e) for e in edges)


def _validated_mean_radius(mean_radius: float | None, ndim: int) -> float:
    """Default the radius per dimensionality; refuse radii that cannot be drawn."""
    if mean_radius is None:
        return DEFAULT_MEAN_RADIUS[ndim]
    is_number = isinstance(mean_radius, Real) and not isinstance(mean_radius, bool)
    if not is_number or not np.isfinite(mean_radius) or mean_radius < 2:
        raise ValueError(f"mean_radius must be a number of at least 2 pixels, got {mean_radius!r}")
    return float(mean_radius)


def _paint_nuclei(
    rng: np.random.Generator, shape: tuple[int, ...], mean_radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Place nuclei one by one until the target fraction of pixels is covered.

    Where two nuclei overlap, each pixel goes to the one whose boundary it lies
    deepest inside, so touching neighbours keep a plausible shared border.
    Returns the instance labels and the photons each nucleus emits.
    """
    target = rng.uniform(*FOREGROUND_FRACTION_RANGE) * np.prod(shape)
    labels = np.zeros(shape, dtype=np.uint32)
    photons = np.zeros(shape, dtype=np.float32)
    depth = np.full(shape, np.inf, dtype=np.float32)  # normalised distance of the owner
    neighbours = _NeighbourGrid(spacing=2 * CONTACT_FACTOR * mean_radius * np.exp(RADIUS_LOG_LIMIT))
    expected_count = target / (_unit_ball_volume(len(shape)) * mean_radius ** len(shape))
    tries_left = MAX_PLACEMENT_TRIES_PER_NUCLEUS * max(1, int(expected_count))
    covered, count = 0, 0
    while covered < target and tries_left > 0:
        tries_left -= 1
        nucleus = _random_nucleus(rng, shape, mean_radius)
        if not neighbours.leaves_room(nucleus.center, nucleus.radius):
            continue
        neighbours.add(nucleus.center, nucleus.radius)
        count += 1
        box, offsets = _bounding_box(nucleus, shape)
        distance = _normalized_distance(nucleus, offsets)
        wins = distance < np.minimum(depth[box], 1.0)
        covered += int(np.count_nonzero(wins & (labels[box] == 0)))
        labels[box][wins] = count
        depth[box][wins] = distance[wins]
        photons[box][wins] = _nucleus_photons(rng, nucleus, offsets, distance)[wins]
    return _consecutive_labels(labels), photons


class _NeighbourGrid:
    """Centres of placed nuclei, bucketed so a new one is checked only against near ones.

    Keeps placement linear in the number of nuclei instead of quadratic.
    ``spacing`` must be at least the largest distance that ``leaves_room`` tests.
    """

    def __init__(self, spacing: float) -> None:
        self.spacing = spacing
        self.cells: dict[tuple[int, ...], list[tuple[np.ndarray, float]]] = {}

    def _cell(self, center: np.ndarray) -> tuple[int, ...]:
        return tuple(np.floor(center / self.spacing).astype(int).tolist())

    def leaves_room(self, center: np.ndarray, radius: float) -> bool:
        """Allow contact and slight overlap with neighbours, but not engulfing."""
        home = self._cell(center)
        for step in itertools.product((-1, 0, 1), repeat=len(home)):
            cell = tuple(h + s for h, s in zip(home, step, strict=True))
            for other, other_radius in self.cells.get(cell, ()):
                if np.linalg.norm(other - center) < CONTACT_FACTOR * (radius + other_radius):
                    return False
        return True

    def add(self, center: np.ndarray, radius: float) -> None:
        self.cells.setdefault(self._cell(center), []).append((center, radius))


def _unit_ball_volume(ndim: int) -> float:
    """Area of the unit disc or volume of the unit sphere."""
    return np.pi if ndim == 2 else 4 / 3 * np.pi


def _consecutive_labels(labels: np.ndarray) -> np.ndarray:
    """Number the surviving nuclei 1..n, in uint16 whenever n fits.

    A nucleus can in principle lose all its pixels to later neighbours; renumbering
    keeps the labels free of gaps so that ``labels.max()`` is the count.
    """
    present = np.unique(labels)
    if present[-1] != len(present) - 1:
        lookup = np.zeros(int(present[-1]) + 1, dtype=np.uint32)
        lookup[present] = np.arange(len(present), dtype=np.uint32)
        labels = lookup[labels]
    fits_uint16 = len(present) - 1 <= np.iinfo(np.uint16).max
    return labels.astype(np.uint16 if fits_uint16 else np.uint32)


def _random_nucleus(
    rng: np.random.Generator, shape: tuple[int, ...], mean_radius: float
) -> _Nucleus:
    """Draw size, eccentricity, orientation, position and brightness."""
    ndim = len(shape)
    log_radius = np.clip(rng.normal(0, RADIUS_LOG_SPREAD), -RADIUS_LOG_LIMIT, RADIUS_LOG_LIMIT)
    radius = mean_radius * np.exp(log_radius)
    axis_logs = rng.normal(0, AXIS_LOG_SPREAD, size=ndim)
    semi_axes = radius * np.exp(axis_logs - axis_logs.mean())
    center = rng.uniform(0, 1, size=ndim) * np.asarray(shape) - 0.5
    log_brightness = np.clip(rng.normal(0, BRIGHTNESS_LOG_SPREAD), *BRIGHTNESS_LOG_LIMITS)
    brightness = NUCLEUS_PHOTONS * np.exp(log_brightness)
    return _Nucleus(center, _random_rotation(rng, ndim), semi_axes, float(brightness))


def _random_rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    """A uniformly random rotation matrix (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((ndim, ndim)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _bounding_box(
    nucleus: _Nucleus, shape: tuple[int, ...]
) -> tuple[tuple[slice, ...], list[np.ndarray]]:
    """Slices of the image around the nucleus and open-grid offsets from its centre.

    Rendering inside this box keeps the cost per nucleus independent of the
    image size.
    """
    half_extent = np.sqrt(((nucleus.rotation * nucleus.semi_axes) ** 2).sum(axis=1))
    lower = np.maximum(np.floor(nucleus.center - half_extent).astype(int), 0)
    upper = np.minimum(np.ceil(nucleus.center + half_extent).astype(int) + 1, shape)
    box = tuple(slice(lo, hi) for lo, hi in zip(lower, upper, strict=True))
    grids = np.ogrid[box]
    offsets = [grid - c for grid, c in zip(grids, nucleus.center, strict=True)]
    return box, offsets


def _normalized_distance(nucleus: _Nucleus, offsets: list[np.ndarray]) -> np.ndarray:
    """Ellipsoid radius through each pixel: below 1 inside, 0 at the centre."""
    squared = 0.0
    for axis in range(len(offsets)):
        along = sum(nucleus.rotation[i, axis] * offsets[i] for i in range(len(offsets)))
        squared = squared + (along / nucleus.semi_axes[axis]) ** 2
    return np.sqrt(squared).astype(np.float32)


def _nucleus_photons(
    rng: np.random.Generator,
    nucleus: _Nucleus,
    offsets: list[np.ndarray],
    distance: np.ndarray,
) -> np.ndarray:
    """Brightness with a slightly dimmer rim and a few bright nucleoli.

    Overlapping nucleoli saturate at ``NUCLEOLI_MAX_GAIN`` so that the brightest
    pixel, and with it the PSNR's data range, hardly depends on the image size.
    """
    nucleoli = sum(
        (_nucleolus(rng, nucleus, offsets) for _ in range(rng.poisson(NUCLEOLI_PER_NUCLEUS))),
        start=np.zeros_like(distance),
    )
    relative = 1.0 - EDGE_DIMMING * distance**2 + np.minimum(nucleoli, NUCLEOLI_MAX_GAIN)
    return nucleus.brightness * relative


def _nucleolus(
    rng: np.random.Generator, nucleus: _Nucleus, offsets: list[np.ndarray]
) -> np.ndarray:
    """A small Gaussian spot in the inner part of the nucleus, relative to its brightness."""
    ndim = len(offsets)
    direction = rng.standard_normal(ndim)
    direction *= 0.55 * rng.uniform() ** (1 / ndim) / np.linalg.norm(direction)
    position = nucleus.rotation @ (direction * nucleus.semi_axes)
    sigma = 0.15 * nucleus.radius
    amplitude = rng.uniform(*NUCLEOLUS_AMPLITUDE_RANGE)
    squared = sum((o - p) ** 2 for o, p in zip(offsets, position, strict=True))
    return amplitude * np.exp(-squared / (2 * sigma**2))


def _texture(rng: np.random.Generator, shape: tuple[int, ...], mean_radius: float) -> np.ndarray:
    """Multiplicative chromatin texture: smooth blotches plus a finer grain."""
    coarse = _smooth_noise(rng, shape, sigma=mean_radius / 4)
    fine = _smooth_noise(rng, shape, sigma=1.0)
    texture = 1.0 + COARSE_TEXTURE_AMPLITUDE * coarse + FINE_TEXTURE_AMPLITUDE * fine
    return np.clip(texture, *TEXTURE_LIMITS).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return noise / max(float(noise.std()), 1e-12)


def _uneven_background(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth illumination and autofluorescence: a few waves longer than the image."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    field = np.zeros(shape, dtype=np.float32)
    for _ in range(4):
        frequency = rng.uniform(-1.0, 1.0, size=len(shape)) / np.asarray(shape)
        phase = sum(2 * np.pi * f * g for f, g in zip(frequency, grids, strict=True))
        field += np.cos(phase + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    field -= field.min()
    field /= max(float(field.max()), 1e-12)
    low, high = BACKGROUND_PHOTONS_RANGE
    return (low + (high - low) * field).astype(np.float32)


def _record(rng: np.random.Generator, clean: np.ndarray) -> np.ndarray:
    """Camera recording: Poisson shot noise on the photons plus Gaussian read noise."""
    shot = rng.poisson(np.clip(clean, 0, None)).astype(np.float32)
    read = rng.normal(0.0, READ_NOISE_PHOTONS, size=clean.shape).astype(np.float32)
    return shot + read
