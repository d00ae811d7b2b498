"""Pyramidal TIFF writing and the demo cohort writer (slides, masks, sample sheet)."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import tifffile

from wsiattack.atomic import atomic_file
from wsiattack.errors import ConfigError
from wsiattack.synthetic.fields import _LOWRES_FACTOR
from wsiattack.synthetic.render import _downsample, render_slide_with_masks

logger = logging.getLogger(__name__)

SAMPLE_COLUMNS = ("slide_id", "path", "label")

# Random-stream tags for write_demo_cohort: (seed, tag, ...) keeps the slide and label streams
# apart (SeedSequence([s]) == SeedSequence([s, 0]), so a bare trailing index would be unsafe).
_SLIDE_STREAM = 1
_LABEL_STREAM = 2
_SHARE_STREAM = 4  # a positive slide's tumour share
# Tag of the slides the trained demo encoder learns from (wsiattack.encoders.demo_training):
# never the cohort's, so the encoder has not seen the slides it is evaluated on.
ENCODER_TRAINING_STREAM = 3


def write_pyramidal_tiff(
    path: Path,
    image: np.ndarray,
    *,
    mpp: float,
    downsamples: Sequence[int] = (1, 4, 16),
    tile_px: int = 256,
    jpeg_quality: int = 90,
) -> None:
    """Write ``image`` as a tiled, JPEG-compressed pyramidal TIFF that OpenSlide reads.

    One page per level (OpenSlide's generic-tiff reader ignores SubIFDs): level 0 with
    ``subfiletype=0``, reduced levels with ``subfiletype=1``. Resolution tags are in pixels per
    centimetre (``1e4 / (mpp * downsample)``); OpenSlide derives ``openslide.mpp-x``/``-y`` from
    XResolution/YResolution when ResolutionUnit is centimetre. Written atomically.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    downsamples = [int(d) for d in downsamples]
    increasing = all(b > a for a, b in itertools.pairwise(downsamples))
    if not downsamples or downsamples[0] != 1 or not increasing:
        raise ValueError(f"downsamples must start at 1 and increase strictly, got {downsamples}")
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    if tile_px % 16:
        raise ValueError(f"tile_px must be a multiple of 16 (TIFF tiles), got {tile_px}")

    def write(fh: BinaryIO) -> None:
        # bigtiff only when needed: plain TIFF is the most widely readable.
        bigtiff = image.nbytes > 2**31
        with tifffile.TiffWriter(fh, bigtiff=bigtiff) as tif:
            level, previous = image, 1
            for i, downsample in enumerate(downsamples):
                # Each level from the previous one when the ratio is integral (cheaper).
                if downsample % previous == 0:
                    level = _downsample(level, downsample // previous)
                else:
                    level = _downsample(image, downsample)
                previous = downsample
                px_per_cm = 1e4 / (mpp * downsample)
                tif.write(
                    level,
                    photometric="rgb",
                    tile=(tile_px, tile_px),
                    compression="jpeg",
                    compressionargs={"level": jpeg_quality},
                    subfiletype=0 if i == 0 else 1,
                    resolution=(px_per_cm, px_per_cm),
                    resolutionunit="CENTIMETER",
                    metadata=None,  # no JSON ImageDescription
                    datetime=None,  # no DateTime tag: byte-identical reruns
                )

    with atomic_file(path) as tmp, open(tmp, "xb") as fh:
        write(fh)


def _balanced_labels(n_slides: int, seed: int) -> np.ndarray:
    """0/1 per slide: floor(n/2) negatives, ceil(n/2) positives, in a seeded random order."""
    base = np.array([0] * (n_slides // 2) + [1] * (n_slides - n_slides // 2))
    return np.random.default_rng((seed, _LABEL_STREAM)).permutation(base)


def write_demo_cohort(
    *,
    slides_dir: Path,
    samples_csv: Path,
    n_slides: int,
    seed: int,
    classes: Sequence[str],
    mpp: float = 0.5,
    width_px: int = 5600,
    height_px: int = 4480,
    tumor_share: float = 0.08,
    min_tumor_share: float | None = None,
    masks_dir: Path | None = None,
    workers: int = 1,
) -> pd.DataFrame:
    """Write ``n_slides`` synthetic slides ``demo_{i:03d}.tiff`` and their sample sheet.

    Labels are ``classes[0]`` (no tumour) or ``classes[1]`` (tumour regions), balanced and in a
    seeded order. A positive slide's tumour covers a share of its tissue drawn log-uniformly from
    [``min_tumor_share``, ``tumor_share``] (default: exactly ``tumor_share``), so that some carry
    only small foci. Slide ``i`` is rendered from ``default_rng((seed, 1, i))``, so each file
    depends only on (seed, i, size, mpp, the tumour shares, its label). With ``masks_dir``, each
    slide's tumour mask is written there too (``{slide_id}.npz``: ``tumor`` bool at
    ``downsample`` 4, the generator's own ground truth). Returns the sample sheet (columns
    ``slide_id, path, label``; ``path`` relative to the directory of ``samples_csv``), which is
    also written atomically to ``samples_csv``.
    """
    classes = list(classes)
    if len(classes) != 2:
        raise ConfigError(f"the demo cohort has exactly 2 classes (negative, positive), got {len(classes)}: {classes}")
    if classes[0] == classes[1]:
        raise ConfigError(f"the two classes must differ, got {classes}")
    if n_slides < 2:
        raise ConfigError(f"n_slides must be at least 2 (one per class), got {n_slides}")
    if seed < 0:
        raise ConfigError(f"seed must be non-negative, got {seed}")
    min_tumor_share = tumor_share if min_tumor_share is None else min_tumor_share
    if not 0.0 < min_tumor_share <= tumor_share:
        raise ConfigError(f"need 0 < min_tumor_share <= tumor_share, got {min_tumor_share} and {tumor_share}")
    slides_dir, samples_csv = Path(slides_dir), Path(samples_csv)
    slides_dir.mkdir(parents=True, exist_ok=True)
    if masks_dir is not None:
        Path(masks_dir).mkdir(parents=True, exist_ok=True)

    labels = _balanced_labels(n_slides, seed)

    def write_slide(i: int) -> dict[str, str]:
        slide_id, positive = f"demo_{i:03d}", int(labels[i])
        path = slides_dir / f"{slide_id}.tiff"
        rng = np.random.default_rng((seed, _SLIDE_STREAM, i))
        # Its own stream, drawn only when the share varies: the slide's other draws never move.
        share = tumor_share
        if min_tumor_share < tumor_share:
            share_rng = np.random.default_rng((seed, _SHARE_STREAM, i))
            share = float(np.exp(share_rng.uniform(np.log(min_tumor_share), np.log(tumor_share))))
        rendered = render_slide_with_masks(
            rng=rng, width_px=width_px, height_px=height_px, tumor=bool(positive), tumor_share=share
        )
        write_pyramidal_tiff(path, rendered.image, mpp=mpp)
        if masks_dir is not None:
            f = _LOWRES_FACTOR
            with atomic_file(Path(masks_dir) / f"{slide_id}.npz") as tmp, open(tmp, "xb") as fh:
                np.savez_compressed(fh, tumor=rendered.tumor[::f, ::f], downsample=np.int64(f))
        logger.info(
            "wrote %s (%s, tumour share %.4f, %dx%d px, %.3f mpp)",
            path,
            classes[positive],
            share if positive else 0.0,
            width_px,
            height_px,
            mpp,
        )
        # Relative to the sheet, as the workflow resolves it: the cohort can be moved as a whole.
        return {"slide_id": slide_id, "path": os.path.relpath(path, samples_csv.parent), "label": classes[positive]}

    # Each slide has its own generator, so threads (numpy and the JPEG codec release the GIL)
    # change nothing in the output.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rows = list(pool.map(write_slide, range(n_slides)))

    sheet = pd.DataFrame(rows, columns=list(SAMPLE_COLUMNS))

    with atomic_file(samples_csv) as tmp, open(tmp, "xb") as fh:
        fh.write(sheet.to_csv(index=False, lineterminator="\n").encode("utf-8"))
    return sheet
