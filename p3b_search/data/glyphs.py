"""The embedded glyphs transfer task: characters rendered from the fonts matplotlib ships.

A harder sibling of the digits task, built so that pruning methods can be told apart:

* **source** (pretraining): the 26 capitals A-Z in eight sans-serif and monospace faces
  (DejaVu Sans and DejaVu Sans Mono, regular/bold/oblique), dark grey ink on a plain light
  grey background, with mild jitter in position, size, angle and shear;
* **target** (transfer): the 26 lower-case letters a-z (other classes) in eight serif faces
  (DejaVu Serif and STIX General, regular/bold/italic): coloured ink on a coloured, smoothly
  varying background, a faint distractor glyph cut by the border and pixel noise (another
  appearance).

Every glyph is centred on its ink box and scaled so that the box's longer side is 70 % of the
image (a lower-case letter is as large as a capital), then jittered. Every image is drawn from
a seeded generator, so the sets are deterministic; each domain is generated once (about 5 s for
both) and cached under the cache folder, keyed by a hash of what that domain depends on
(:meth:`GlyphsSpec.key`), as ``uint8`` arrays ``(n, size, size, 3)``. Train and val are
separate draws (checked disjoint by the tests). Images are scaled to the model's input size
(bilinear) and normalised with the model's mean/std, and held in memory as tensors.

The target appearance was calibrated (``benchmarks/task_calibration.py``) so that the
benchmark recipe's dense transfer lands between 70 % and 92 % top-1.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from p3b_search.data.tensors import normalised_images
from p3b_search.files import atomic_write, default_cache_dir, file_lock

#: Bump when a change below changes the generated images (invalidates caches).
GENERATOR_VERSION = 1

_SOURCE_FACES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
                 "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
                 "DejaVuSansMono-BoldOblique.ttf")
_TARGET_FACES = ("DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
                 "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf")
_CANVAS = 64  # glyphs are drawn and transformed at this size (pixels), then reduced to GlyphsSpec.size
_INK_SIDE = 0.7  # the longer side of every glyph's ink box, as a fraction of the image side (before jitter)


@dataclass(frozen=True)
class Appearance:
    """How one domain's images look: geometric jitter, colours and clutter.

    Angles in degrees, shifts in fractions of the image side, scales relative to a glyph whose
    ink box's longer side is 70 % of the image side."""

    faces: tuple[str, ...]
    rotation: float
    scale: tuple[float, float]
    shear: float
    shift: float
    coloured: bool
    background_variation: float
    distractor_alpha: tuple[float, float]
    min_contrast: float
    noise_std: float


@dataclass(frozen=True)
class GlyphsSpec:
    """What is generated: classes, image side, images per class and split, the appearances."""

    size: int = 24
    source_classes: str = string.ascii_uppercase
    target_classes: str = string.ascii_lowercase
    source_train_per_class: int = 300
    source_val_per_class: int = 40
    target_train_per_class: int = 200
    target_val_per_class: int = 100
    seed: int = 0
    source: Appearance = Appearance(
        faces=_SOURCE_FACES, rotation=8.0, scale=(0.85, 1.05), shear=0.05, shift=0.06, coloured=False,
        background_variation=0.0, distractor_alpha=(0.0, 0.0), min_contrast=0.6, noise_std=0.02)
    target: Appearance = Appearance(
        faces=_TARGET_FACES, rotation=8.0, scale=(0.85, 1.05), shear=0.05, shift=0.06, coloured=True,
        background_variation=0.1, distractor_alpha=(0.1, 0.25), min_contrast=0.5, noise_std=0.03)

    def key(self, domain: str) -> str:
        """sha256 over what one domain's images depend on (the cache key): this spec's fields of
        that domain, the generator version, the font files and the rasteriser's versions."""
        self.classes(domain)
        fields = dataclasses.asdict(self)
        other = "target" if domain == "source" else "source"
        look = self.source if domain == "source" else self.target
        text = json.dumps({"spec": {k: v for k, v in fields.items() if not k.startswith(other)},
                           "version": GENERATOR_VERSION, "renderer": _renderer_fingerprint(look.faces)},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def classes(self, domain: str) -> str:
        if domain not in ("source", "target"):
            raise ValueError(f"glyphs domain {domain!r} is unknown: use 'source' or 'target'")
        return self.source_classes if domain == "source" else self.target_classes


GLYPHS = GlyphsSpec()


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.cache
def _renderer_fingerprint(faces: tuple[str, ...]) -> str:
    """sha256 of the font files and the Pillow and FreeType versions that draw the glyphs."""
    import PIL
    from PIL import features

    digest = hashlib.sha256(f"{PIL.__version__} {features.version('freetype2')}".encode())
    for face in faces:
        digest.update((_font_dir() / face).read_bytes())
    return digest.hexdigest()


def _glyph_masks(faces: Sequence[str], classes: str) -> np.ndarray:
    """Ink coverage ``(faces, classes, _CANVAS, _CANVAS)`` in [0, 1], each glyph centred by its ink box
    and scaled so that the box's longer side is ``_INK_SIDE`` of the canvas (so a lower-case
    letter is as large as a capital)."""
    from PIL import Image, ImageDraw, ImageFont

    masks = np.zeros((len(faces), len(classes), _CANVAS, _CANVAS), dtype=np.float32)
    for f, face in enumerate(faces):
        font = ImageFont.truetype(str(_font_dir() / face), size=int(_CANVAS * 0.62))
        for c, char in enumerate(classes):
            image = Image.new("L", (_CANVAS, _CANVAS), 0)
            ImageDraw.Draw(image).text((_CANVAS / 2, _CANVAS / 2), char, fill=255, font=font, anchor="mm")
            left, top, right, bottom = image.getbbox() or (0, 0, _CANVAS, _CANVAS)
            zoom = _INK_SIDE * _CANVAS / max(right - left, bottom - top)
            # inverse map: output pixel -> input pixel, centring the ink box at the zoomed size
            cx, cy = (left + right) / 2, (top + bottom) / 2
            image = image.transform(image.size, Image.Transform.AFFINE,
                                    (1 / zoom, 0, cx - _CANVAS / 2 / zoom, 0, 1 / zoom, cy - _CANVAS / 2 / zoom),
                                    resample=Image.Resampling.BILINEAR)
            masks[f, c] = np.asarray(image, dtype=np.float32) / 255.0
    return masks


def _random_affine(rng: np.random.Generator, look: Appearance, offset: tuple[float, float]) -> tuple[float, ...]:
    """PIL's inverse affine coefficients (output -> input pixel) of a random jitter about the centre."""
    angle = np.deg2rad(rng.uniform(-look.rotation, look.rotation))
    scale = rng.uniform(*look.scale)
    shear = rng.uniform(-look.shear, look.shear)
    shift = rng.uniform(-look.shift, look.shift, size=2) * _CANVAS + np.asarray(offset) * _CANVAS
    forward = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.array(
        [[1.0, shear], [0.0, 1.0]])
    inverse = np.linalg.inv(forward)
    centre = np.array([_CANVAS / 2, _CANVAS / 2])
    translation = centre - inverse @ (centre + shift)
    return (inverse[0, 0], inverse[0, 1], translation[0], inverse[1, 0], inverse[1, 1], translation[1])


def _place(mask: np.ndarray, coefficients: tuple[float, ...], size: int) -> np.ndarray:
    """``mask`` (canvas) under the affine map, reduced to ``(size, size)`` by area averaging."""
    from PIL import Image

    image = Image.fromarray(mask).transform(
        (_CANVAS, _CANVAS), Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BILINEAR)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX), dtype=np.float32)


def _backgrounds(rng: np.random.Generator, count: int, size: int, look: Appearance) -> np.ndarray:
    """``(count, size, size, 3)`` in [0, 1]: a random base colour (light grey for a grey look)
    plus a smooth random field of amplitude ``look.background_variation``."""
    if look.coloured:
        base = rng.uniform(0.0, 1.0, size=(count, 1, 1, 3))
    else:
        base = np.broadcast_to(rng.uniform(0.75, 0.95, size=(count, 1, 1, 1)), (count, 1, 1, 3))
    grid = torch.as_tensor(rng.uniform(-1.0, 1.0, size=(count, 3, 3, 3)), dtype=torch.float32)
    field = torch.nn.functional.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True)
    field = field.permute(0, 2, 3, 1).numpy() * look.background_variation
    return np.clip(base + field, 0.0, 1.0).astype(np.float32)


def _inks(rng: np.random.Generator, background: np.ndarray, look: Appearance) -> np.ndarray:
    """``(count, 3)`` ink colours whose brightness differs from the background mean by >= ``min_contrast``
    (for a grey look: a darker grey)."""
    mean = background.mean(axis=(1, 2))  # (count, 3)
    if not look.coloured:
        return np.clip(mean - rng.uniform(0.6, 0.8, size=(len(mean), 1)), 0, 1).astype(np.float32)
    inks = rng.uniform(0.0, 1.0, size=mean.shape)
    for _ in range(64):  # redraw the colours that are too close to their background
        close = np.abs(inks.mean(axis=1) - mean.mean(axis=1)) < look.min_contrast
        if not close.any():
            break
        inks[close] = rng.uniform(0.0, 1.0, size=(int(close.sum()), 3))
    close = np.abs(inks.mean(axis=1) - mean.mean(axis=1)) < look.min_contrast
    inks[close] = np.where(mean[close].mean(axis=1, keepdims=True) > 0.5, 0.0, 1.0)
    return inks.astype(np.float32)


def render(spec: GlyphsSpec, domain: str, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (n, size, size, 3), labels int64 (n,))``: ``per_class`` draws of every class."""
    classes = spec.classes(domain)
    look = spec.source if domain == "source" else spec.target
    rng = np.random.default_rng([spec.seed, seed, 0 if domain == "source" else 1])
    masks = _glyph_masks(look.faces, classes)
    labels = np.repeat(np.arange(len(classes)), per_class)
    rng.shuffle(labels)
    count = len(labels)
    faces = rng.integers(len(look.faces), size=count)
    ink = np.empty((count, spec.size, spec.size), dtype=np.float32)
    clutter = np.zeros_like(ink)
    for i in range(count):
        ink[i] = _place(masks[faces[i], labels[i]], _random_affine(rng, look, (0.0, 0.0)), spec.size)
        if look.distractor_alpha[1] > 0:
            side = rng.uniform(-1, 1, size=2)
            side /= np.abs(side).max()  # on the border of the unit square: the distractor is cut off
            other = masks[rng.integers(len(look.faces)), rng.integers(len(classes))]
            clutter[i] = rng.uniform(*look.distractor_alpha) * _place(
                other, _random_affine(rng, look, tuple(0.75 * side)), spec.size)
    background = _backgrounds(rng, count, spec.size, look)
    inks = _inks(rng, background, look)[:, None, None, :]
    clutter_inks = _inks(rng, background, look)[:, None, None, :]
    image = background * (1 - clutter[..., None]) + clutter_inks * clutter[..., None]
    image = image * (1 - ink[..., None]) + inks * ink[..., None]
    image = image + rng.normal(0.0, look.noise_std, size=image.shape)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8), labels.astype(np.int64)


def _splits(spec: GlyphsSpec, domain: str) -> dict[str, int]:
    if domain == "source":
        return {"train": spec.source_train_per_class, "val": spec.source_val_per_class}
    return {"train": spec.target_train_per_class, "val": spec.target_val_per_class}


def glyphs_arrays(spec: GlyphsSpec, domain: str, cache_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """``{"train_images", "train_labels", "val_images", "val_labels"}`` of one domain, from the cache
    (generated and written atomically on a miss; concurrent callers wait on a file lock)."""
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"glyphs-{domain}-{spec.key(domain)[:16]}.npz"
    if not path.is_file():
        with file_lock(directory / f"{path.name}.lock"):
            if not path.is_file():
                arrays = {}
                for offset, (split, per_class) in enumerate(_splits(spec, domain).items()):
                    images, labels = render(spec, domain, per_class, seed=offset)
                    arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
                with atomic_write(path) as tmp:
                    with open(tmp, "wb") as f:
                        np.savez(f, **arrays)
    with np.load(path) as stored:
        return {name: stored[name] for name in stored.files}


def glyphs_datasets(
    domain: str, image_size: int, mean: Sequence[float], std: Sequence[float], spec: GlyphsSpec = GLYPHS
) -> tuple[TensorDataset, TensorDataset, int]:
    """``(train, val, num_classes)`` of one glyphs domain; items are ``(image (3,H,W), label)``."""
    arrays = glyphs_arrays(spec, domain)

    def dataset(split: str) -> TensorDataset:
        pixels = torch.as_tensor(arrays[f"{split}_images"]).permute(0, 3, 1, 2)
        return TensorDataset(normalised_images(pixels, 255.0, image_size, mean, std),
                             torch.as_tensor(arrays[f"{split}_labels"]))

    return dataset("train"), dataset("val"), len(spec.classes(domain))
