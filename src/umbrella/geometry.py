"""Image geometry facts that data/ and model/ both need: which modalities exist, how a modality's
image and patch sizes are checked, how many visual tokens one image becomes (after optional token
pooling) and how a convolutional stem splits a patch into stride-2 stages.

They live here, below both, so the data path can count an image's tokens and check a config's
geometry without importing the model (imports only go down)::

    {image_size, patch_size}  --check_modality-->  normalised spec  --pooled_tokens-->  N tokens
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from umbrella.errors import ModelError

KNOWN_MODALITIES = ("T1", "rsfMRI", "dMRI")
PATCH_EMBEDS = ("linear", "conv", "connectivity")
DEFAULT_STEM_CHANNELS = (16, 32, 64, 128)
STEM_STYLES = ("strided", "pooled")


def check_modality(name: str, spec: dict) -> dict:
    """Normalise one modality spec and check its geometry; raises ValueError naming the modality."""
    if name not in KNOWN_MODALITIES:
        raise ValueError(f"unknown modality {name!r} in vision_config.modalities; "
                         f"choose from {', '.join(KNOWN_MODALITIES)}")
    image_size = [int(v) for v in spec["image_size"]]
    patch_size = [int(v) for v in spec["patch_size"]]
    if len(image_size) != len(patch_size) or len(image_size) not in (3, 4):
        raise ValueError(f"{name}: image_size {image_size} and patch_size {patch_size} must both be "
                         "(D, H, W) or, for 4D inputs such as rsfMRI windows, (D, H, W, T)")
    for axis, (size, patch) in enumerate(zip(image_size, patch_size, strict=True)):
        if patch <= 0 or size % patch:
            raise ValueError(f"{name}: image_size[{axis}]={size} is not a multiple of "
                             f"patch_size[{axis}]={patch}; change one of them")
    out = {"in_channels": int(spec.get("in_channels", 1)), "image_size": image_size,
           "patch_size": patch_size, "embed": spec.get("embed", "linear")}
    if spec.get("center"):
        out["center"] = True
    if out["embed"] not in PATCH_EMBEDS:
        raise ValueError(f"{name}: embed={out['embed']!r} is not a patch embedding; choose one of "
                         f"{', '.join(PATCH_EMBEDS)} (config key model.patch_embed)")
    if out["embed"] == "connectivity":
        if len(image_size) != 4 or patch_size[3] != image_size[3]:
            raise ValueError(f"{name}: embed=connectivity reads each region's series over the whole "
                             f"window, so it needs 4D inputs whose time patch is the window "
                             f"(patch_size[3] = image_size[3]); got image_size {image_size}, "
                             f"patch_size {patch_size}")
        if num_patches(out) < 2:
            raise ValueError(f"{name}: embed=connectivity needs at least 2 regions (patches); got "
                             f"image_size {image_size}, patch_size {patch_size}")
    if out["embed"] == "conv":
        out["stem_channels"] = [int(c) for c in spec.get("stem_channels", DEFAULT_STEM_CHANNELS)]
        out["stem_style"] = spec.get("stem_style", "strided")
        if out["stem_style"] not in STEM_STYLES:
            raise ValueError(f"{name}: stem_style={out['stem_style']!r} is not a stem; choose one of "
                             f"{', '.join(STEM_STYLES)} (config key model.stem_style)")
        stem_plan(name, out)  # raises when the patch cannot be built from stride-2 stages
    return out


def _twos(n: int) -> int:
    """How many times 2 divides n."""
    return (n & -n).bit_length() - 1


def stem_plan(name: str, spec: dict) -> tuple[list[tuple[int, int, int]], tuple[int, int, int]]:
    """The convolutional stem of a ``conv`` modality: (stride of each 3x3x3 stage, kernel = stride
    of the final projection), both per spatial axis (D, H, W).

    Each axis's patch is split into stride-2 stages while it stays even, the odd rest going to
    the final projection, so the token grid is the linear patches' grid: patch 16 -> four stages
    (2, 2, 2) and a 1x1x1 projection; patch (16, 16, 12) -> stage strides (2, 2, 2), (2, 2, 2),
    (2, 2, 1), (2, 2, 1) and a (1, 1, 3) projection. Stage i has ``stem_channels[i]`` channels.
    Raises ValueError, naming the modality and the fix, when no axis allows a stride-2 stage or
    ``stem_channels`` gives fewer widths than there are stages.
    """
    patch = spec["patch_size"][:3]
    twos = [_twos(p) for p in patch]
    stages = max(twos)
    if stages == 0:
        raise ValueError(f"{name}: patch_size {spec['patch_size']} has no even spatial entry, so the "
                         "convolutional stem (model.patch_embed=conv) has no stride-2 stage to build; "
                         "use an even patch size (e.g. 16) or model.patch_embed=linear")
    widths = spec["stem_channels"]
    if len(widths) < stages or any(c <= 0 for c in widths):
        raise ValueError(f"{name}: patch_size {spec['patch_size']} needs {stages} stride-2 stem "
                         f"stages but model.stem_channels={widths} gives {len(widths)} positive "
                         f"widths; give at least {stages} (e.g. "
                         f"{[16 * 2 ** i for i in range(stages)]})")
    strides = [tuple(2 if i < t else 1 for t in twos) for i in range(stages)]
    rest = tuple(p >> t for p, t in zip(patch, twos, strict=True))
    return strides, rest


def num_patches(spec: dict) -> int:
    """Visual tokens one image of this modality becomes."""
    return math.prod(s // p for s, p in zip(spec["image_size"], spec["patch_size"], strict=True))


def token_grid(spec: dict) -> tuple[int, int, int, int]:
    """(time blocks, D', H', W') of one image's tokens: the order in which the tower emits them
    (time blocks outermost, then the 3D patch grid in C order). 3D modalities have 1 time block."""
    size, patch = spec["image_size"], spec["patch_size"]
    grid = tuple(s // p for s, p in zip(size[:3], patch[:3], strict=True))
    blocks = size[3] // patch[3] if len(size) == 4 else 1
    return (blocks, *grid)


POOL_ALL = "all"  # token_pool: every image's whole spatial token grid averaged into one token


def normalize_token_pool(token_pool: int | str | Sequence[int] | None
                         ) -> tuple[int, int, int] | str | None:
    """None for "no pooling" (None, 1 or (1, 1, 1)); :data:`POOL_ALL` as it is (the window is
    each modality's grid: :func:`resolve_token_pool`); else the (d, h, w) pooling window."""
    if token_pool is None:
        return None
    if token_pool == POOL_ALL:
        return POOL_ALL
    pool = () if isinstance(token_pool, str) else (
        (token_pool,) * 3 if isinstance(token_pool, int) else tuple(token_pool))
    if len(pool) != 3 or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                                 for k in pool):
        raise ModelError(f"token_pool must be a positive integer, 3 of them (d, h, w) or "
                         f"{POOL_ALL!r}, got {token_pool!r}")
    return None if pool == (1, 1, 1) else pool


def resolve_token_pool(token_pool: int | str | Sequence[int] | None,
                       spec: dict) -> tuple[int, int, int] | None:
    """The (d, h, w) window for images of geometry ``spec``: :data:`POOL_ALL` becomes the spatial
    token grid itself (one token per image and time block); None: no pooling."""
    pool = normalize_token_pool(token_pool)
    return normalize_token_pool(token_grid(spec)[1:]) if pool == POOL_ALL else pool


def pooled_tokens(spec: dict, token_pool: int | str | Sequence[int] | None = None,
                  modality: str = "image") -> int:
    """Visual tokens one image of geometry ``spec`` ({image_size, patch_size}) gives to the LLM
    after ``token_pool``: the count each ``<image>`` must be expanded to. Raises ModelError when
    the token grid is not a multiple of the pool, naming both."""
    pool = resolve_token_pool(token_pool, spec)
    if pool is None:
        return num_patches(spec)
    blocks, *grid = token_grid(spec)
    bad = [(g, k) for g, k in zip(grid, pool, strict=True) if g % k]
    if bad:
        raise ModelError(f"{modality}: the token grid {tuple(grid)} (image_size / patch_size) is "
                         f"not a multiple of token_pool {pool}; change the pool, the patch size "
                         "or the image size")
    return blocks * math.prod(g // k for g, k in zip(grid, pool, strict=True))
