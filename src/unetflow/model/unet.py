"""A configurable U-Net for 2D and 3D images, with its receptive field computed exactly.

The network pads any input internally up to a multiple of ``2**depth`` and crops back, so
callers may pass tiles of any size. Its receptive field is derived from the layer sequence
(not measured), which is what tiled prediction needs to choose an exact halo.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NORMS", "ACTIVATIONS", "DOWNSAMPLES", "UPSAMPLES", "UNet", "build_unet", "exact_halo",
           "encoder_config", "encoder_state", "layer_settings", "ENCODER_PARTS"]

NORMS = ("batch", "group", "instance", "none")
ACTIVATIONS = ("relu", "leaky_relu", "gelu", "silu")
DOWNSAMPLES = ("maxpool", "conv")
UPSAMPLES = ("transpose", "interpolate")

KERNEL_SIZE = 3  # of every feature convolution; padding KERNEL_SIZE // 2 keeps the shape
SCALE = 2  # of every down- and upsampling step
BLOCK_REACH = 2 * (KERNEL_SIZE // 2)  # pixels one conv block (two convolutions) reads per side
MAX_GROUPS = 8  # for group normalisation

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TRANSPOSE = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_MAX_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_BATCH_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_ACTIVATION = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU, "silu": nn.SiLU}
# The encoder: the convolution blocks and downsamplings of the contracting path (not the
# bottleneck), what train.freeze_encoder_steps holds and train.init_encoder_only copies;
# its shape is set by these constructor arguments alone (not out_channels, upsample, residual)
ENCODER_PARTS = ("encoders", "downsamplings")
_ENCODER_CONFIG = ("spatial_dims", "in_channels", "depth", "base_features", "growth", "norm",
                   "activation", "downsample")

_MODEL_KEYS = (
    "depth", "base_features", "growth", "norm", "activation", "downsample", "upsample", "residual",
)


def _require_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """Fail early, naming the option, the bad value and the allowed ones."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")


def _require_positive_int(name: str, value: int) -> None:
    """Fail early on counts that would build an empty or broken network."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


def features_per_level(depth: int, base_features: int, growth: float) -> list[int]:
    """Channel counts of levels 0..depth (the last is the bottleneck): round(base * growth**i)."""
    return [max(1, round(base_features * growth**level)) for level in range(depth + 1)]


def group_count(channels: int) -> int:
    """The largest number of groups <= MAX_GROUPS that divides ``channels`` evenly."""
    return max(g for g in range(1, MAX_GROUPS + 1) if channels % g == 0)


def _norm_layer(norm: str, spatial_dims: int, channels: int) -> nn.Module:
    """One normalisation layer; all of them learn a scale and shift, ``none`` is the identity."""
    if norm == "batch":
        return _BATCH_NORM[spatial_dims](channels)
    if norm == "group":
        return nn.GroupNorm(group_count(channels), channels)
    if norm == "instance":
        return _INSTANCE_NORM[spatial_dims](channels, affine=True)
    return nn.Identity()


def _conv_block(
    spatial_dims: int, in_channels: int, out_channels: int, norm: str, activation: str
) -> nn.Sequential:
    """Two shape-keeping convolutions, each followed by norm and activation.

    The convolutions have no bias when a norm follows, since the norm's shift replaces it.
    """
    layers: list[nn.Module] = []
    for channels_in in (in_channels, out_channels):
        layers += [
            _CONV[spatial_dims](
                channels_in, out_channels, KERNEL_SIZE, padding=KERNEL_SIZE // 2,
                bias=norm == "none",
            ),
            _norm_layer(norm, spatial_dims, out_channels),
            _ACTIVATION[activation](),
        ]
    return nn.Sequential(*layers)


def _downsampling(kind: str, spatial_dims: int, channels: int) -> nn.Module:
    """Halve each spatial axis: max pooling, or a learned stride-2 convolution of kernel 2."""
    if kind == "maxpool":
        return _MAX_POOL[spatial_dims](SCALE)
    return _CONV[spatial_dims](channels, channels, SCALE, stride=SCALE)


def _upsampling(kind: str, spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """Double each spatial axis: a transposed convolution, or nearest resize then a 3x3 conv.

    Nearest (not linear) resizing keeps each fine pixel tied to one coarse pixel, as the
    transposed convolution does, so the receptive field stays on the same 2**depth grid.
    """
    if kind == "transpose":
        return _CONV_TRANSPOSE[spatial_dims](in_channels, out_channels, SCALE, stride=SCALE)
    return nn.Sequential(
        nn.Upsample(scale_factor=SCALE, mode="nearest"),
        _CONV[spatial_dims](in_channels, out_channels, KERNEL_SIZE, padding=KERNEL_SIZE // 2),
    )


# Input intervals, one axis at a time. Every layer maps an interval [lo, hi] of its output
# positions to the interval of its input positions they depend on (ignoring image borders);
# all layers act per axis on boxes, so one axis describes every axis.
def _through_conv(lo: int, hi: int, kernel_size: int = KERNEL_SIZE) -> tuple[int, int]:
    """Positions a centred, shape-keeping convolution reads."""
    return lo - kernel_size // 2, hi + kernel_size // 2


def _through_downsampling(lo: int, hi: int) -> tuple[int, int]:
    """Positions a kernel-2 stride-2 pool or convolution reads: coarse v reads 2v and 2v+1."""
    return SCALE * lo, SCALE * hi + SCALE - 1


def _through_upsampling(lo: int, hi: int) -> tuple[int, int]:
    """Positions a stride-2 transposed conv or nearest resize reads: fine v reads v // 2."""
    return lo // SCALE, hi // SCALE


def _grow(box: list[tuple[int, int]], reach: int, sizes: list[int]) -> list[tuple[int, int]]:
    """Intervals ``box`` widened by ``reach`` on each side, clipped to [0, size)."""
    return [(max(0, lo - reach), min(size, hi + reach))
            for (lo, hi), size in zip(box, sizes, strict=True)]


def _crop(t: torch.Tensor, box: list[tuple[int, int]], origin: list[int]) -> torch.Tensor:
    """The part of ``t`` (whose first pixel sits at ``origin``) inside intervals ``box``."""
    return t[(..., *(slice(lo - o, hi - o) for (lo, hi), o in zip(box, origin, strict=True)))]


def _hull(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    """The smallest interval holding both; where branches join, dependencies add up."""
    return min(a[0], b[0]), max(a[1], b[1])


class UNet(nn.Module):
    """U-Net: ``depth`` poolings, two 3x3(x3) convolutions per level, skips by concatenation.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the input image.
        out_channels: classes (segmentation logits) or output channels (regression).
        depth: number of down- (and up-) sampling steps; inputs are padded to 2**depth.
        base_features: channels at full resolution.
        growth: channels grow by this factor per level, rounded.
        norm: one of NORMS.
        activation: one of ACTIVATIONS.
        downsample: one of DOWNSAMPLES.
        upsample: one of UPSAMPLES.
        residual: add the input to the output (the net learns a correction, as for
            denoising); needs in_channels == out_channels.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        depth: int = 3,
        base_features: int = 16,
        growth: float = 2.0,
        norm: str = "batch",
        activation: str = "relu",
        downsample: str = "maxpool",
        upsample: str = "transpose",
        residual: bool = False,
    ) -> None:
        super().__init__()
        self._config = dict(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
            depth=depth, base_features=base_features, growth=growth, norm=norm,
            activation=activation, downsample=downsample, upsample=upsample, residual=residual,
        )
        _validate_config(self._config)
        features = features_per_level(depth, base_features, growth)
        conv = _CONV[spatial_dims]
        block = functools.partial(_conv_block, spatial_dims, norm=norm, activation=activation)
        self.encoders = nn.ModuleList(
            block(cin, cout)
            for cin, cout in zip([in_channels] + features[:-2], features[:-1], strict=True)
        )
        self.downsamplings = nn.ModuleList(
            _downsampling(downsample, spatial_dims, f) for f in features[:-1]
        )
        self.bottleneck = block(features[-2], features[-1])
        self.upsamplings = nn.ModuleList(
            _upsampling(upsample, spatial_dims, features[i + 1], features[i]) for i in range(depth)
        )
        self.decoders = nn.ModuleList(block(2 * f, f) for f in features[:-1])
        self.head = conv(features[0], out_channels, 1)

    @property
    def spatial_dims(self) -> int:
        """2 or 3."""
        return self._config["spatial_dims"]

    @property
    def depth(self) -> int:
        """Number of down- and upsampling steps."""
        return self._config["depth"]

    @property
    def size_multiple(self) -> int:
        """2**depth: the network runs on multiples of this; forward pads other sizes to it."""
        return SCALE**self.depth

    def config(self) -> dict[str, Any]:
        """The constructor's keyword arguments as a plain dict: ``UNet(**model.config())``."""
        return dict(self._config)

    def parameter_count(self) -> int:
        """Number of scalar parameters, trainable or not."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, *spatial) -> (N, out_channels, *spatial), any spatial size.

        Each axis is zero-padded at its end to a multiple of ``size_multiple`` and the output
        cropped back, so the caller never meets a pooling shape error.
        """
        self._check_input(x)
        spatial_shape = x.shape[2:]
        y = self._forward_aligned(F.pad(x, self._end_padding(spatial_shape)))
        y = y[(..., *(slice(0, s) for s in spatial_shape))]
        return y + x if self._config["residual"] else y

    def _check_input(self, x: torch.Tensor) -> None:
        """Name the shape we got and the one we need instead of a PyTorch error deep inside."""
        expected = 2 + self.spatial_dims
        if x.ndim != expected or x.shape[1] != self._config["in_channels"]:
            raise ValueError(
                f"input of shape {tuple(x.shape)} is not (N, {self._config['in_channels']}, "
                f"{', '.join('*' * self.spatial_dims)}) for this {self.spatial_dims}D U-Net"
            )
        if any(s < 1 for s in x.shape[2:]):
            raise ValueError(f"input of shape {tuple(x.shape)} has an empty spatial axis")

    def _end_padding(self, spatial_shape: torch.Size) -> list[int]:
        """F.pad arguments that pad each axis at its end up to a multiple of size_multiple.

        Batch and instance norm cannot normalise one value per channel, which the bottleneck
        would hold when every axis fits in one multiple; the last axis then gets two.
        """
        m = self.size_multiple
        padded = [math.ceil(s / m) * m for s in spatial_shape]
        if self._config["norm"] in ("batch", "instance") and all(p == m for p in padded):
            padded[-1] = 2 * m
        pads: list[int] = []
        for size, target in zip(reversed(spatial_shape), reversed(padded), strict=True):
            pads += [0, target - size]
        return pads

    def _forward_aligned(self, x: torch.Tensor) -> torch.Tensor:
        """The U-Net proper, on sizes that are multiples of size_multiple."""
        skips = []
        for encoder, downsampling in zip(self.encoders, self.downsamplings, strict=True):
            x = encoder(x)
            skips.append(x)
            x = downsampling(x)
        x = self.bottleneck(x)
        for level in reversed(range(self.depth)):
            x = self.upsamplings[level](x)
            x = self.decoders[level](torch.cat([x, skips[level]], dim=1))
        return self.head(x)

    def forward_core(self, x: torch.Tensor, halo: int) -> torch.Tensor:
        """forward(x) without ``halo`` pixels on each side, at about 0.8x the work.

        Tiled prediction keeps only a window's core, and every output pixel needs the
        encoder's context (the halo), but the decoder, about two thirds of the arithmetic,
        needs at each level only the core plus two pixels per convolution. So the encoder
        runs on the whole window, each decoder level on the core's footprint plus that
        margin. Inside the core the values are those of forward(x): a cropped convolution
        is wrong only in the margins it discards, and where the crop meets the window's edge
        it zero-pads exactly as the full pass does. Group and instance norms take statistics
        over the whole tensor, so for them this is forward(x) cropped.
        """
        self._check_input(x)
        spatial_shape = x.shape[2:]
        core_shape = [s - 2 * halo for s in spatial_shape]
        if halo < 0 or halo % self.size_multiple or min(core_shape) < 1:
            raise ValueError(f"halo {halo} must be a multiple of {self.size_multiple} that "
                             f"leaves a core inside the input of shape {tuple(x.shape)}")
        core = (..., *(slice(halo, halo + c) for c in core_shape))
        if self._config["norm"] in ("group", "instance") or halo == 0:
            return self.forward(x)[core]
        padded = F.pad(x, self._end_padding(spatial_shape))
        skips, h = [], padded
        for encoder, downsampling in zip(self.encoders, self.downsamplings, strict=True):
            h = encoder(h)
            skips.append(h)
            h = downsampling(h)
        bottom = self.bottleneck(h)
        needs = self._decoder_needs([(halo, halo + c) for c in core_shape], padded.shape[2:])
        y = self._decode_cropped(bottom, skips, needs)
        y = y[(..., *(slice(0, c) for c in core_shape))]
        return y + x[core] if self._config["residual"] else y

    def _decoder_needs(self, core: list[tuple[int, int]], padded_shape: torch.Size
                       ) -> list[list[tuple[int, int]]]:
        """Per level 0..depth, the intervals (per axis) where the decoder's output is needed:
        level 0 is the core; each coarser level covers what the finer one reads through
        its two convolutions (and the upsampling's convolution), clipped to the tensor."""
        reach = BLOCK_REACH + (self._config["upsample"] == "interpolate") * (KERNEL_SIZE // 2)
        needs = [core]
        for level in range(self.depth):
            reads = _grow(needs[-1], reach, [s // SCALE**level for s in padded_shape])
            needs.append([(lo // SCALE, -(-hi // SCALE)) for lo, hi in reads])
        return needs

    def _decode_cropped(self, bottom: torch.Tensor, skips: list[torch.Tensor],
                        needs: list[list[tuple[int, int]]]) -> torch.Tensor:
        """The decoder on the intervals of ``needs``, coarse to fine; returns level 0's."""
        d = _crop(bottom, needs[self.depth], [0] * len(needs[0]))
        for level in reversed(range(self.depth)):
            sizes = skips[level].shape[2:]
            reads = _grow(needs[level], BLOCK_REACH, sizes)
            up_origin = [SCALE * lo for lo, _ in needs[level + 1]]
            if self._config["upsample"] == "interpolate":
                resize, conv = self.upsamplings[level]
                wider = _grow(reads, KERNEL_SIZE // 2, sizes)
                up = conv(_crop(resize(d), wider, up_origin))
                up = _crop(up, reads, [lo for lo, _ in wider])
            else:
                up = _crop(self.upsamplings[level](d), reads, up_origin)
            merged = torch.cat([up, _crop(skips[level], reads, [0] * len(reads))], dim=1)
            d = _crop(self.decoders[level](merged), needs[level], [lo for lo, _ in reads])
        return self.head(d)

    def input_interval(self, position: int) -> tuple[int, int]:
        """First and last input position (one axis) that the output at ``position`` reads.

        Derived from the layer sequence, ignoring image borders: positions are relative, so
        the interval of ``position + size_multiple`` is this one shifted by size_multiple.
        """
        interval = self._decoder_interval(0, position, position)
        return _hull(interval, (position, position)) if self._config["residual"] else interval

    def _encoder_interval(self, level: int, lo: int, hi: int) -> tuple[int, int]:
        """Input positions read by positions [lo, hi] of encoder ``level``'s output."""
        lo, hi = _through_conv(*_through_conv(lo, hi))
        if level == 0:
            return lo, hi
        return self._encoder_interval(level - 1, *_through_downsampling(lo, hi))

    def _decoder_interval(self, level: int, lo: int, hi: int) -> tuple[int, int]:
        """Input positions read by positions [lo, hi] of decoder ``level``'s output.

        Level ``depth`` is the bottleneck, which is the encoder's deepest block.
        """
        if level == self.depth:
            return self._encoder_interval(level, lo, hi)
        lo, hi = _through_conv(*_through_conv(lo, hi))
        from_skip = self._encoder_interval(level, lo, hi)
        if self._config["upsample"] == "interpolate":
            lo, hi = _through_conv(lo, hi)
        from_below = self._decoder_interval(level + 1, *_through_upsampling(lo, hi))
        return _hull(from_skip, from_below)

    def reach_by_phase(self) -> list[tuple[int, int]]:
        """(left, right) reach of the output at each position 0..size_multiple-1.

        Pooling ties output pixels to a 2**depth grid, so how far an output pixel reads
        depends on its position modulo size_multiple: entry k holds, for outputs p with
        p % size_multiple == k, the distances p - first and last - p to the inputs it reads.
        """
        reaches = []
        for phase in range(self.size_multiple):
            first, last = self.input_interval(phase)
            reaches.append((phase - first, last - phase))
        return reaches

    def receptive_field_radius(self) -> int:
        """The farthest distance, along one axis, between an output pixel and an input it reads.

        Exact, not a bound: the maximum over output phases (positions modulo size_multiple)
        and both sides of ``input_interval``. Perturbing one input pixel q changes exactly the
        outputs p whose interval holds q (for generic weights), so the farthest changed output
        is at most this radius from q and, maximised over the phase of q, equal to it. For one
        q it is smaller by less than size_multiple (depth 4, base 32: 92 to 107 per side).
        """
        return max(max(left, right) for left, right in self.reach_by_phase())


def _validate_config(config: dict[str, Any]) -> None:
    """Check every constructor argument, naming the first bad one."""
    if config["spatial_dims"] not in (2, 3):
        raise ValueError(f"spatial_dims={config['spatial_dims']!r} must be 2 or 3")
    for name in ("in_channels", "out_channels", "depth", "base_features"):
        _require_positive_int(name, config[name])
    if not isinstance(config["growth"], (int, float)) or not config["growth"] > 0:
        raise ValueError(f"growth={config['growth']!r} must be a positive number")
    _require_choice("norm", config["norm"], NORMS)
    _require_choice("activation", config["activation"], ACTIVATIONS)
    _require_choice("downsample", config["downsample"], DOWNSAMPLES)
    _require_choice("upsample", config["upsample"], UPSAMPLES)
    if config["residual"] and config["in_channels"] != config["out_channels"]:
        raise ValueError(
            f"residual=True adds the input to the output, so in_channels="
            f"{config['in_channels']} must equal out_channels={config['out_channels']}"
        )


def encoder_config(config: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments (UNet.config()) that shape the encoder."""
    return {k: config.get(k) for k in _ENCODER_CONFIG}


def encoder_state(state: dict[str, Any]) -> dict[str, Any]:
    """The entries of a state dict that belong to the encoder (ENCODER_PARTS), normalization
    statistics included."""
    return {k: v for k, v in state.items() if k.split(".", 1)[0] in ENCODER_PARTS}


def layer_settings(model_section: dict[str, Any]) -> dict[str, Any]:
    """The model section's keys that shape the layers (not spatial_dims, num_classes, or
    what a segmentation network learns: `unetflow.targets.TARGET_KEYS`)."""
    return {k: v for k, v in model_section.items() if k in _MODEL_KEYS}


def build_unet(
    model_section: dict[str, Any], spatial_dims: int, in_channels: int, out_channels: int
) -> UNet:
    """Build the U-Net described by the config's ``model:`` section (all keys optional).

    Unknown keys are refused, so that a misspelt option cannot silently fall back to a default.
    """
    unknown = sorted(set(model_section) - set(_MODEL_KEYS))
    if unknown:
        raise ValueError(f"model: unknown keys {unknown}; allowed are {list(_MODEL_KEYS)}")
    return UNet(spatial_dims, in_channels, out_channels, **model_section)


def exact_halo(model: UNet) -> int:
    """The smallest halo with which tiled prediction equals one whole-image pass.

    Tiles whose output origins lie on the size_multiple grid need a halo that (1) covers how
    far their pixels read past the tile's edges and (2) is itself a multiple of
    size_multiple, so that each tile's pooling grid is the whole image's. That is the edge
    reach rounded up; it never exceeds ``receptive_field_radius()`` rounded up (depth 4,
    base 32: radius 107 but edge reach 94, halo 96).
    """
    m = model.size_multiple
    reaches = model.reach_by_phase()
    past_first = max(left - phase for phase, (left, _) in enumerate(reaches))
    past_last = max(right - (m - 1 - phase) for phase, (_, right) in enumerate(reaches))
    return math.ceil(max(past_first, past_last) / m) * m

