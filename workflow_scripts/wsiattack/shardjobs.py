"""The GPU rules' jobs: one encoder built per job, then every slide of one shard.

``extract_shard`` embeds each slide's tiles into ``{out_dir}/{slide}.zarr``; ``attack_shard``
perturbs each slide's selected tiles (``attacks.perturb.perturb_slide``) and re-embeds them
(``extraction.reembed_slide``) in the same process, into two per-shard directories; for a
transfer attack it only perturbs (on the surrogate), and ``reembed_shard`` re-embeds the stored
tiles with each target. ``shuffle_shard`` writes the shuffled control of another attack, and
``universal_shard`` adds each slide's fold's universal pattern to its tiles. Each output
directory is written whole to a temporary sibling and renamed at the end (``stores.atomic_dir``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wsiattack import extraction, stores, tiling
from wsiattack.attacks.perturb import perturb_slide
from wsiattack.attacks.shuffle import shuffle_slide
from wsiattack.attacks.universal import apply_universal_slide, fold_of_slides, read_pattern
from wsiattack.encoders.model import TileEncoder
from wsiattack.errors import StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSlide:
    """One slide of a shard: its id, its tiles store, and where the slide file is now."""

    slide_id: str
    tiles_store: str
    slide_path: str | None = None


def shard_slides(
    slide_ids: Sequence[str], tiles_stores: Sequence[str | Path], slide_paths: Sequence[str] | None = None
) -> list[ShardSlide]:
    """Zip parallel lists (slide ids, tiles stores, optionally slide paths) into ShardSlides;
    without paths, each slide is read where its tiles store recorded it (the sample sheet's path)."""
    paths = list(slide_paths) if slide_paths else [None] * len(slide_ids)
    if not len(slide_ids) == len(tiles_stores) == len(paths):
        raise ValueError(f"{len(slide_ids)} slide ids, {len(tiles_stores)} tiles stores and {len(paths)} slide paths")
    return [
        ShardSlide(s, str(t), None if p is None else str(p))
        for s, t, p in zip(slide_ids, tiles_stores, paths, strict=True)
    ]


def slides_in(tiles_dir: str | Path, *, tiling_spec: Mapping[str, Any]) -> list[ShardSlide]:
    """The slides of a shard: one per tiles store in the tile job's directory, each read where its
    store recorded it; a store tiled with another spec than ``tiling_spec`` is refused (stale).
    GPU jobs take their slide list from here, not from the sample sheet, so on a cluster they
    need neither the sheet nor the demo checkpoint."""
    expected = tiling.expected_tiles_attrs(tiling_spec)
    slides = []
    for store in stores.slide_stores([tiles_dir]):
        stores.open_tiles(store, expected=expected)
        slides.append(ShardSlide(store.name.removesuffix(".zarr"), str(store), None))
    return slides


def extract_shard(
    *,
    slides: Sequence[ShardSlide],
    encoder: TileEncoder,
    batch_size: int,
    device: torch.device,
    out_dir: str | Path,
    reader_threads: int = 1,
) -> int:
    """Clean features of every slide of a shard; return the tiles embedded."""
    started, total = time.perf_counter(), 0
    with stores.atomic_dir(out_dir) as tmp:
        for i, slide in enumerate(slides, 1):
            total += extraction.extract_slide(
                slide_id=slide.slide_id,
                tiles_store=slide.tiles_store,
                slide_path=slide.slide_path,
                encoder=encoder,
                batch_size=batch_size,
                device=device,
                out_store=stores.slide_store(tmp, slide.slide_id),
                reader_threads=reader_threads,
            )
            log.info("shard: %d/%d slides extracted", i, len(slides))
    log.info("shard of %d slides: %d tiles in %.1f s", len(slides), total, time.perf_counter() - started)
    return total


def attack_shard(
    *,
    slides: Sequence[ShardSlide],
    encoder: TileEncoder,
    spec: Mapping[str, Any],
    batch_size: int,
    device: torch.device,
    out_attacks: str | Path,
    out_reembedded: str | Path | None,
    features_dir: str | Path | None = None,
    mil_head_of: Callable[[str], Any] | None = None,
    reader_threads: int = 1,
    reembed_encoder: TileEncoder | None = None,
) -> int:
    """Perturb, then re-embed, the selected tiles of every slide of a shard; return the tiles attacked.

    ``features_dir`` is the shard's clean features (for the selections and objectives that need
    them); ``mil_head_of(slide_id)`` gives the gray-box attacks the head of the slide's test fold.
    ``out_reembedded`` None: perturb only (a transfer attack's surrogate job; ``reembed_shard``
    re-embeds the tiles with each target). ``reembed_encoder``: the pipeline that re-embeds the
    stored tiles where it is not the attacker's model (a randomised defence: the pipeline draws
    once, its adaptive attacker averages draws); ``encoder`` by default.
    """
    total = 0
    with contextlib.ExitStack() as outputs:
        attacks_tmp = outputs.enter_context(stores.atomic_dir(out_attacks))
        reembedded_tmp = outputs.enter_context(stores.atomic_dir(out_reembedded)) if out_reembedded else None
        for slide in slides:
            attack_store = stores.slide_store(attacks_tmp, slide.slide_id)
            features_store = stores.slide_store(features_dir, slide.slide_id) if features_dir else None
            mil_head = mil_head_of(slide.slide_id) if mil_head_of else None
            total += perturb_slide(
                slide_id=slide.slide_id,
                tiles_store=slide.tiles_store,
                slide_path=slide.slide_path,
                encoder=encoder,
                spec=spec,
                device=device,
                out_store=attack_store,
                features_store=features_store,
                mil_head=mil_head,
                reader_threads=reader_threads,
            )
            if reembedded_tmp is not None:
                _reembed(slide.slide_id, attack_store, reembed_encoder or encoder, batch_size, device, reembedded_tmp)
    return total


def shuffle_shard(
    *, slides: Sequence[ShardSlide], spec: Mapping[str, Any], source_dir: str | Path, out_attacks: str | Path
) -> int:
    """The shuffled control (``attacks.shuffle``) of the source attack's stores of a shard."""
    total = 0
    with stores.atomic_dir(out_attacks) as tmp:
        for slide in slides:
            total += shuffle_slide(
                slide_id=slide.slide_id,
                source_store=stores.slide_store(source_dir, slide.slide_id),
                tiles_store=slide.tiles_store,
                slide_path=slide.slide_path,
                spec=spec,
                out_store=stores.slide_store(tmp, slide.slide_id),
            )
    return total


def universal_shard(
    *,
    slides: Sequence[ShardSlide],
    spec: Mapping[str, Any],
    splits_csv: str | Path,
    pattern_of_fold: Mapping[int, str | Path],
    out_attacks: str | Path,
) -> int:
    """Each slide's selected tiles plus the universal pattern of the fold in which it is a test
    slide (learned without it, ``attacks.universal``); return the tiles perturbed."""
    fold_of = fold_of_slides(splits_csv)
    patterns: dict[int, tuple] = {}  # each fold's pattern read and checked once per shard
    total = 0
    with stores.atomic_dir(out_attacks) as tmp:
        for slide in slides:
            if slide.slide_id not in fold_of:
                raise StoreError(f"{slide.slide_id}: not in {splits_csv}; re-run the split rule")
            fold = fold_of[slide.slide_id]
            if fold not in patterns:
                patterns[fold] = read_pattern(pattern_of_fold[fold], spec=spec)
            total += apply_universal_slide(
                slide_id=slide.slide_id,
                tiles_store=slide.tiles_store,
                slide_path=slide.slide_path,
                pattern=patterns[fold],
                spec=spec,
                out_store=stores.slide_store(tmp, slide.slide_id),
            )
    return total


def reembed_shard(
    *,
    attacks_dir: str | Path,
    encoder: TileEncoder,
    batch_size: int,
    device: torch.device,
    out_reembedded: str | Path,
) -> int:
    """Re-embed a shard's stored perturbed tiles with ``encoder`` (a transfer attack's target, or
    the encoder of a shuffled control); return the tiles embedded."""
    total = 0
    with stores.atomic_dir(out_reembedded) as tmp:
        for store in stores.slide_stores([attacks_dir]):
            total += _reembed(store.name.removesuffix(".zarr"), store, encoder, batch_size, device, tmp)
    return total


def _reembed(slide_id, attack_store, encoder, batch_size, device, out_dir) -> int:
    return extraction.reembed_slide(
        slide_id=slide_id,
        attack_store=attack_store,
        encoder=encoder,
        batch_size=batch_size,
        device=device,
        out_store=stores.slide_store(out_dir, slide_id),
    )
