"""Universal perturbations: one L∞ pattern per (encoder, fold), learned label-free on tiles of the
fold's training slides only, then added to the selected tiles of the fold's test slides.

Learning (UTAP-style, Wang et al. 2025; Moosavi-Dezfooli et al.'s universal perturbation made
label-free): maximise the mean objective (default 1 − cos(f(x + δ), f(x))) over ``train_tiles``
random tiles of every training slide, by signed-gradient ascent on one δ shared by all tiles,
in minibatches of ``batch_tiles``, projected onto |δ| ≤ eps after every step. δ starts uniform
in the box (the objective's gradient is exactly zero at δ = 0). After every pass over the
training tiles (and after the last step) the pattern is rounded to whole grey levels and scored
on all training tiles as it will be applied; the best of these scored patterns is kept.

The pattern store (``stores.UNIVERSAL``) holds ``pattern`` int16 (T, T, 3), the grey-level
offsets, and the training log (``train_objective`` per step; ``eval_step`` and
``eval_objective`` per scoring); attrs record the spec, the encoder, the fold, the training
slides and the kept step. Applying it needs no encoder: ``adv = clip(clean + pattern, 0, 255)``,
the same offsets on every tile up to the clipping, whose share is stored per tile (``clipped``).
The application writes ordinary attack stores, which the reembed rule embeds with every target.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsiattack import runtime, stores
from wsiattack.attacks.budget import slide_rng, tiles_to_attack
from wsiattack.attacks.driver import attack_mode, check_gradient, forward_precision
from wsiattack.attacks.objectives import ObjectiveFn, get_objective
from wsiattack.attacks.params import learning_spec, method_params, threat_marking
from wsiattack.attacks.selection import random_selection
from wsiattack.encoders.embedding import channels_first
from wsiattack.encoders.model import TileEncoder
from wsiattack.errors import AttackError
from wsiattack.tilereader import TileReader

log = logging.getLogger(__name__)

UNIVERSAL_STREAM = 3  # random stream of the training tiles (0 picks the attacked tiles, 1 probes, 2 shuffles)


@dataclass(frozen=True)
class LearnedPattern:
    levels: np.ndarray  # int16 (T, T, 3) grey-level offsets, |levels| <= floor(eps * 255)
    train_objective: np.ndarray  # float32 (steps,) mean objective of each step's minibatch
    eval_step: np.ndarray  # int32 steps at which the rounded pattern was scored (0 = the start)
    eval_objective: np.ndarray  # float32 its mean objective on all training tiles
    best_step: int


def learn_pattern(
    encoder: TileEncoder,
    tiles_uint8: np.ndarray,
    *,
    eps: float,
    steps: int,
    step_size: float,
    batch_tiles: int,
    objective: ObjectiveFn,
    generator: torch.Generator,
    device: torch.device,
    precision: str = "float32",
) -> LearnedPattern:
    """One universal pattern for (n, T, T, 3) uint8 training tiles (see the module docstring);
    ``precision``: of the forward passes (``runtime.attack_precision``)."""
    n = len(tiles_uint8)
    if n == 0:
        raise AttackError("no training tiles to learn a universal perturbation from")
    radius = int(eps * 255 + 1e-6)
    encoder = encoder.to(device).eval()
    reference = _embed(encoder, tiles_uint8, device, precision)
    shape = channels_first(tiles_uint8[:1]).shape[1:]
    delta = ((torch.rand(shape, generator=generator) * 2 - 1) * eps).to(device)
    batches_per_pass = math.ceil(n / batch_tiles)
    order = torch.empty(0, dtype=torch.int64)
    train, eval_steps, eval_values = (
        [],
        [0],
        [_score(encoder, tiles_uint8, delta, radius, reference, objective, device, precision)],
    )
    best_levels, best_value, best_step = _levels(delta, radius), eval_values[0], 0
    with attack_mode(encoder, device=device, precision=precision):
        for step in range(1, steps + 1):
            if len(order) < batch_tiles:  # a new pass over the tiles in a new seeded order
                order = torch.cat([order, torch.randperm(n, generator=generator)])
            rows, order = order[:batch_tiles].sort().values, order[batch_tiles:]
            clean = _unit(tiles_uint8[rows.numpy()], device)
            d = delta.clone().requires_grad_(True)
            embedding = encoder((clean + d).clamp(0, 1)).float()
            with runtime.exact_arithmetic(device):
                value = objective(embedding, reference[rows.to(device)]).mean()
            (grad,) = torch.autograd.grad(value, d)
            check_gradient(grad[None])
            delta = (delta + step_size * grad.sign()).clamp(-eps, eps)
            train.append(float(value.detach()))
            if step % batches_per_pass == 0 or step == steps:
                score = _score(encoder, tiles_uint8, delta, radius, reference, objective, device, precision)
                eval_steps.append(step)
                eval_values.append(score)
                if score > best_value:
                    best_levels, best_value, best_step = _levels(delta, radius), score, step
    log.info(
        "universal pattern: objective %.5f at step %d of %d (start %.5f)", best_value, best_step, steps, eval_values[0]
    )
    return LearnedPattern(
        levels=best_levels,
        train_objective=np.asarray(train, dtype=np.float32),
        eval_step=np.asarray(eval_steps, dtype=np.int32),
        eval_objective=np.asarray(eval_values, dtype=np.float32),
        best_step=best_step,
    )


def _unit(tiles_uint8: np.ndarray, device: torch.device) -> torch.Tensor:
    return channels_first(tiles_uint8).to(device).float() / 255


def _levels(delta: torch.Tensor, radius: int) -> np.ndarray:
    """(3, T, T) pattern -> int16 (T, T, 3) whole grey levels inside the box."""
    return torch.round(delta * 255).clamp(-radius, radius).to(torch.int16).permute(1, 2, 0).cpu().numpy()


SCORE_BATCH = 32  # tiles per forward pass when embedding the training tiles (no gradients)


def _embed(encoder: TileEncoder, tiles_uint8: np.ndarray, device: torch.device, precision: str) -> torch.Tensor:
    """float32 embeddings, in the same precision as the attack's forward passes."""
    with torch.no_grad(), forward_precision(encoder, device=device, mode=precision):
        return torch.cat(
            [
                encoder(_unit(tiles_uint8[s : s + SCORE_BATCH], device)).float()
                for s in range(0, len(tiles_uint8), SCORE_BATCH)
            ]
        )


def _score(encoder, tiles_uint8, delta, radius, reference, objective, device, precision) -> float:
    """Mean objective of the rounded pattern applied as ``apply_pattern`` does, on all tiles."""
    adversarial, _ = apply_pattern(tiles_uint8, _levels(delta, radius))
    embedding = _embed(encoder, adversarial, device, precision)
    with runtime.exact_arithmetic(device):
        return float(objective(embedding, reference).mean())


def apply_pattern(clean_uint8: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(k, T, T, 3) uint8 tiles + int16 (T, T, 3) pattern -> (adversarial uint8, share of values clipped per tile)."""
    if clean_uint8.shape[1:] != levels.shape:
        raise AttackError(f"universal pattern of shape {levels.shape} for tiles of shape {clean_uint8.shape[1:]}")
    unclipped = clean_uint8.astype(np.int16) + levels
    adversarial = np.clip(unclipped, 0, 255).astype(np.uint8)
    clipped = (adversarial != unclipped).reshape(len(clean_uint8), -1).mean(axis=1).astype(np.float32)
    return adversarial, clipped


def training_tiles(
    tile_stores: Sequence[str | Path], *, n_per_slide: int, seed: int
) -> tuple[np.ndarray, dict[str, list[int]]]:
    """``n_per_slide`` seeded random tiles of each slide (all of a smaller slide): uint8 tiles and
    the tile indices used per slide."""
    batches, used = [], {}
    for store in tile_stores:
        slide_id = stores.slide_id_of(store)
        with TileReader(store) as tiles:
            k = min(n_per_slide, tiles.shape[0])
            if k == 0:
                continue
            index = random_selection(tiles.shape[0], k=k, rng=slide_rng(seed, slide_id, stream=UNIVERSAL_STREAM)).index
            batches.append(np.asarray(tiles.get_orthogonal_selection((index,))))
            used[slide_id] = index.tolist()
    if not batches:
        raise AttackError("the training slides of this fold have no tiles")
    return np.concatenate(batches), used


def fold_of_slides(splits_csv: str | Path) -> dict[str, int]:
    """Slide -> the fold in which it is a test slide, from ``results/splits.csv``."""
    with open(splits_csv, newline="") as handle:
        return {record["slide_id"]: int(record["fold"]) for record in csv.DictReader(handle)}


def fold_slides(splits_csv: str | Path, *, fold: int) -> tuple[list[str], list[str]]:
    """(training slides, test slides) of ``fold``."""
    fold_of = fold_of_slides(splits_csv)
    if fold not in set(fold_of.values()):
        raise AttackError(f"{splits_csv}: no fold {fold}; re-run the split rule")
    return [s for s, f in fold_of.items() if f != fold], [s for s, f in fold_of.items() if f == fold]


def learn_universal(
    *,
    tile_stores: Sequence[str | Path],
    splits_csv: str | Path,
    fold: int,
    encoder: TileEncoder,
    spec: Mapping[str, Any],
    device: torch.device,
    out_store: str | Path,
) -> LearnedPattern:
    """Learn the pattern of ``fold`` from its training slides' tiles (the test slides' tiles are
    never read) and write the pattern store."""
    train_slides, _ = fold_slides(splits_csv, fold=fold)
    wanted = set(train_slides)
    stores_of_fold = [s for s in tile_stores if stores.slide_id_of(s) in wanted]
    params = method_params(spec, where="universal", strict=False)
    tiles, used = training_tiles(stores_of_fold, n_per_slide=params["train_tiles"], seed=spec["seed"])
    generator = torch.Generator().manual_seed(
        int(slide_rng(spec["seed"], f"fold{fold}", stream=UNIVERSAL_STREAM).integers(2**62))
    )
    learned = learn_pattern(
        encoder,
        tiles,
        eps=float(spec["eps"]),
        steps=params["steps"],
        step_size=params["step_size"],
        batch_tiles=params["batch_tiles"],
        objective=get_objective(spec["objective"]).fn,
        generator=generator,
        device=device,
        precision=spec.get("precision", "float32"),
    )
    attrs = {
        "attack": learning_spec(spec),
        "encoder": encoder.describe(),
        "fold": fold,
        "method_params": params,
        "bound": {"norm": "linf", "eps": float(spec["eps"]), "radius": float(spec["eps"])},
        "training_tiles": used,
        "n_training_tiles": len(tiles),
        "best_step": learned.best_step,
        "best_objective": float(learned.eval_objective.max()),
        **threat_marking(spec),
    }
    with stores.atomic_store(out_store, kind=stores.UNIVERSAL, attrs=attrs) as group:
        stores.write_array(group, "pattern", learned.levels)
        stores.write_array(group, "train_objective", learned.train_objective)
        stores.write_array(group, "eval_step", learned.eval_step)
        stores.write_array(group, "eval_objective", learned.eval_objective)
    return learned


def read_pattern(path: str | Path, *, spec: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """A pattern store's int16 pattern and attrs, refused if it was learned for another spec."""
    group = stores.open_store(path, kind=stores.UNIVERSAL)
    if group.attrs["attack"] != learning_spec(spec):
        raise AttackError(
            f"{path}: learned with other settings than attack {spec.get('name')!r}; re-run learn_universal"
        )
    return np.asarray(group["pattern"][...]), dict(group.attrs)


def apply_universal_slide(
    *,
    slide_id: str,
    tiles_store: str | Path,
    pattern: tuple[np.ndarray, Mapping[str, Any]],
    spec: Mapping[str, Any],
    out_store: str | Path,
    slide_path: str | Path | None = None,
) -> int:
    """Add the slide's fold's pattern (``read_pattern``: levels and attrs) to the slide's selected
    tiles and write its attack store; return k."""
    levels, pattern_attrs = pattern
    with TileReader(tiles_store, slide_path=slide_path) as tiles:
        n_tiles = tiles.shape[0]
        k = tiles_to_attack(n_tiles, **spec["budget"]) if n_tiles else 0
        index = random_selection(n_tiles, k=k, rng=slide_rng(spec["seed"], slide_id)).index
        clean = np.asarray(tiles.get_orthogonal_selection((index,))) if k else np.empty((0, *levels.shape), np.uint8)
    adversarial, clipped = apply_pattern(clean, levels)
    attrs = {
        "slide_id": slide_id,
        "attack": dict(spec),
        "encoder": pattern_attrs["encoder"],
        "n_tiles": n_tiles,
        "k": k,
        "bound": pattern_attrs["bound"],
        "pattern": {"fold": pattern_attrs["fold"], "best_step": pattern_attrs["best_step"]},
        **threat_marking(spec),
    }
    stores.write_encoder_free_attack(
        out_store,
        attrs=attrs,
        index=index,
        clean=clean,
        adversarial=adversarial,
        clipped=clipped,
        selection_score=np.full(k, np.nan, dtype=np.float32),
    )
    return k
