"""Perturb one slide: choose the tiles, attack them, store the uint8 adversarial tiles.

The attack store holds, per perturbed tile: ``index``, ``adv_tiles``, achieved ``linf`` and
``l2`` (of the stored uint8 tile), ``objective_before_rounding``, ``objective`` (after
rounding), ``iterations`` (gradient evaluations), ``best_step`` and ``selection_score`` (and for
the masked SNAP methods ``masks``, ``mask_area``, ``mask_blobs``); attrs
record the spec, the method parameters actually used, the bound, the selection and its probe
cost in tiles, and the threat model (``params.threat_marking``; plus ``mil_head``, the model and
fold of the head, for the gray-box attacks). The full list is in ``stores``.

Gray-box attacks (selection ``attention``, objective ``mil_cross_entropy``) get ``mil_head``:
the head of the fold in which the slide is a test slide (``oracle.load_fold_head``); both use
the slide's clean features store as the bag. The oracle objective is bound per batch of
``ATTACK_BATCH`` tiles: the selected tiles of earlier batches enter the bag as their rounded
adversarial embeddings, those of later batches are still clean (``_BatchObjectives``).

Wall time is logged (per batch and per tile), not stored: the store is a pure function of the
config, the encoder and the tiles ("same config, same bytes"), so a re-run can be compared
byte for byte; Snakemake's benchmark file already records each job's wall time.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsiattack import runtime, stores
from wsiattack.attacks import selection as sel
from wsiattack.attacks.budget import slide_rng, tiles_to_attack
from wsiattack.attacks.driver import forward_precision
from wsiattack.attacks.methods import Method, build_method
from wsiattack.attacks.objectives import Objective, ObjectiveFn
from wsiattack.attacks.oracle import MILHead
from wsiattack.attacks.params import method_params, threat_marking, uses_mil_head
from wsiattack.defences.aggregation import drop_evasion
from wsiattack.defences.detection import detection_aware, knn_outlier_scores, threshold_at_fpr
from wsiattack.defences.params import HEAD_DEFENCES
from wsiattack.encoders.embedding import channels_first, to_unit_pixels
from wsiattack.encoders.model import TileEncoder
from wsiattack.errors import AttackError, StoreError
from wsiattack.tilereader import TileReader

log = logging.getLogger(__name__)

ATTACK_BATCH = 16  # tiles attacked together; k is small, so this bounds memory, not speed
PROBE_STREAM = 1  # random stream of the vulnerability probe (stream 0 picks tiles and starts)


def perturb_slide(
    *,
    slide_id: str,
    tiles_store: str | Path,
    encoder: TileEncoder,
    spec: Mapping[str, Any],
    out_store: str | Path,
    device: torch.device,
    features_store: str | Path | None = None,
    mil_head: MILHead | None = None,
    slide_path: str | Path | None = None,
    reader_threads: int = 1,
) -> int:
    """Attack ``k`` tiles of one slide with ``spec`` (a normalised attack entry); return k.

    ``features_store`` (clean features of this slide and encoder) is required by the
    ``centrality`` selection and the gray-box attacks, and spares ``vulnerability`` a forward
    pass per tile; ``mil_head`` (``oracle.load_fold_head``) is required by the gray-box attacks.
    The tiles' pixels come from ``TileReader`` (``slide_path``: where the slide is now, default
    the path recorded at tiling).
    """
    with TileReader(tiles_store, slide_path=slide_path, threads=reader_threads) as tiles:
        return _perturb_tiles(
            slide_id=slide_id,
            tiles=tiles,
            encoder=encoder,
            spec=dict(spec),
            out_store=out_store,
            device=device,
            features_store=features_store,
            mil_head=mil_head,
        )


def _perturb_tiles(
    *,
    slide_id: str,
    tiles: TileReader,
    encoder: TileEncoder,
    spec: dict[str, Any],
    out_store: str | Path,
    device: torch.device,
    features_store: str | Path | None,
    mil_head: MILHead | None,
) -> int:
    n_tiles = tiles.shape[0]
    method, objective = build_method(spec, tile_mpp=tiles.group.attrs.get("target_mpp"))
    k = tiles_to_attack(n_tiles, **spec["budget"])
    if k == 0:  # a slide left empty by tiling.skip_empty: nothing to attack, say so in the store
        attrs = {
            "slide_id": slide_id,
            "attack": spec,
            "n_tiles": 0,
            "k": 0,
            "skipped": "no tissue",
            **threat_marking(spec),
        }
        with stores.atomic_store(out_store, kind=stores.ATTACK, attrs=attrs) as group:
            stores.write_array(group, "index", np.empty(0, dtype=np.int64))
            stores.write_tile_batch(group, "adv_tiles", np.empty((0, *tiles.shape[1:]), dtype=np.uint8))
        return 0
    encoder = encoder.to(device).eval()
    rng = slide_rng(spec["seed"], slide_id)
    context = _SelectionContext(
        slide_id=slide_id,
        tiles=tiles,
        encoder=encoder,
        method=method,
        objective=objective,
        device=device,
        features_store=features_store,
        mil_head=_checked_head(mil_head, spec=spec, slide_id=slide_id),
        seed=spec["seed"],
    )
    chosen = _select(spec["selection"], k=k, rng=rng, context=context)
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    objectives = _BatchObjectives(objective, context=context, index=chosen.index, defence=spec.get("defence"))

    started = time.perf_counter()
    clean_uint8 = np.asarray(tiles.get_orthogonal_selection((chosen.index,)))  # one read of k tiles
    batches = []
    for s in range(0, k, ATTACK_BATCH):
        arrays, adversarial_embedding = _attack_batch(
            encoder,
            clean_uint8[s : s + ATTACK_BATCH],
            method=method,
            objective_fn=objectives.for_batch(s),
            generator=generator,
            device=device,
            label=f"{slide_id}[{s}:{s + ATTACK_BATCH}]",
        )
        objectives.record(s, adversarial_embedding)
        batches.append(arrays)
    merged = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    seconds = time.perf_counter() - started
    log.info(
        "%s: attacked %d/%d tiles with %s in %.1f s (%.2f s/tile); mean objective %.4f before, %.4f after rounding",
        slide_id,
        k,
        n_tiles,
        spec.get("name", spec["method"]),
        seconds,
        seconds / k,
        merged["objective_before_rounding"].mean(),
        merged["objective"].mean(),
    )

    attrs = _attrs(
        slide_id=slide_id,
        spec=spec,
        encoder=encoder,
        method=method,
        n_tiles=n_tiles,
        chosen=chosen,
        clean=clean_uint8,
        mil_head=context.mil_head,
    )
    with stores.atomic_store(out_store, kind=stores.ATTACK, attrs=attrs) as group:
        stores.write_array(group, "index", chosen.index)
        stores.write_tile_batch(group, "adv_tiles", merged.pop("adv_tiles"))
        stores.write_array(group, "selection_score", chosen.scores)
        for name, values in merged.items():
            stores.write_array(group, name, values)
    return k


class _SelectionContext:
    """Everything a selection strategy may need, gathered once per slide."""

    def __init__(
        self,
        *,
        slide_id: str,
        tiles,
        encoder: TileEncoder,
        method: Method,
        objective: Objective,
        device: torch.device,
        features_store: str | Path | None,
        mil_head: MILHead | None,
        seed: int,
    ):
        self.slide_id, self.tiles, self.encoder, self.method, self.objective = (
            slide_id,
            tiles,
            encoder,
            method,
            objective,
        )
        self.device, self.features_store, self.mil_head, self.seed = device, features_store, mil_head, seed
        self._features: np.ndarray | None = None

    def features(self, *, required_by: str | None) -> np.ndarray | None:
        """The slide's clean features, checked against the tiles and the encoder (read once)."""
        if self._features is None:
            self._features = self._read_features(required_by=required_by)
        return self._features

    def _read_features(self, *, required_by: str | None) -> np.ndarray | None:
        if self.features_store is None:
            if required_by:
                raise AttackError(
                    f"{self.slide_id}: {required_by} needs the clean features store of this slide: pass features_store"
                )
            return None
        group = stores.open_store(self.features_store, kind=stores.FEATURES)
        if group.attrs.get("weights_id") != self.encoder.weights_id:
            raise StoreError(
                f"{self.features_store}: features of weights {group.attrs.get('weights_id')!r}, but the attacked encoder is {self.encoder.weights_id!r}; re-run extraction"
            )
        features = np.asarray(group["features"][...])
        if len(features) != self.tiles.shape[0]:
            raise StoreError(
                f"{self.features_store}: {len(features)} feature rows for {self.tiles.shape[0]} tiles of {self.slide_id}; re-run extraction"
            )
        return features


def _select(strategy: str, *, k: int, rng: np.random.Generator, context: _SelectionContext) -> sel.Selection:
    if strategy == "random":
        return sel.random_selection(context.tiles.shape[0], k=k, rng=rng)
    if strategy == "centrality":
        return sel.top_k_selection(
            sel.centrality_scores(context.features(required_by="selection 'centrality'")),
            k=k,
            what=f"{context.slide_id}: centrality",
        )
    if strategy == "attention":
        return _attention_selection(context, k=k)
    if strategy == "vulnerability":
        return _vulnerability_selection(context, k=k)
    raise AttackError(f"unknown selection {strategy!r}: use one of {', '.join(sel.SELECTIONS)}")


def _attention_selection(context: _SelectionContext, *, k: int) -> sel.Selection:
    features = context.features(required_by="selection 'attention'")
    context.mil_head.check_bag(features.shape[1], where=str(context.features_store))
    scores = sel.attention_scores(head=context.mil_head.module, bag=features)
    return sel.top_k_selection(scores, k=k, what=f"{context.slide_id}: attention")


def _checked_head(mil_head: MILHead | None, *, spec: Mapping[str, Any], slide_id: str) -> MILHead | None:
    if uses_mil_head(spec) and mil_head is None:
        raise AttackError(
            f"{slide_id}: attack {spec.get('name', '?')!r} (selection {spec['selection']!r}, objective {spec.get('objective')!r}) needs the trained MIL head of the slide's test fold: pass mil_head"
        )
    return mil_head


class _BatchObjectives:
    """The objective of each batch. Label-free: the same per-tile distance for every batch. Oracle:
    the slide's cross-entropy on a bag in which the batch's rows are the embeddings being
    optimised, the rows of earlier batches their stored (rounded) adversarial embeddings, and the
    rest clean: a greedy joint attack, batch by batch (one batch when k <= ATTACK_BATCH)."""

    def __init__(
        self,
        objective: Objective,
        *,
        context: _SelectionContext,
        index: np.ndarray,
        defence: Mapping[str, Any] | None = None,
    ):
        self.objective, self.context, self.bag, self.evading = objective, context, None, None
        self.defence = defence or {}
        if defence and defence["kind"] == "knn_filter" and not objective.needs_mil_head:
            self.evading = _detection_evasion(context, index=index, defence=defence)  # label-free: no head
        if objective.needs_mil_head:
            features = context.features(required_by=f"objective {objective.name!r}")
            context.mil_head.check_bag(features.shape[1], where=str(context.features_store))
            context.mil_head.module.to(context.device)
            self.bag = torch.as_tensor(features, dtype=torch.float32, device=context.device).clone()
            self.rows = torch.as_tensor(index, device=context.device)

    def for_batch(self, start: int) -> ObjectiveFn:
        if self.bag is None:
            fn = self.objective.fn
        else:
            rows = self.rows[start : start + ATTACK_BATCH]
            fn = self.context.mil_head.objective_for(bag=self.bag, rows=rows)
            if self.defence.get("kind") in HEAD_DEFENCES:  # a dropped tile has no gradient through the head
                fn = drop_evasion(
                    fn,
                    defended=self.context.mil_head.module,
                    bag=self.bag,
                    rows=rows,
                    weight=self.defence["detection_weight"],
                )
        return self.evading(fn) if self.evading else fn

    def record(self, start: int, adversarial_embedding: torch.Tensor) -> None:
        """The batch's adversarial embeddings replace its clean rows for the batches after it."""
        if self.bag is not None:
            self.bag[self.rows[start : start + ATTACK_BATCH]] = adversarial_embedding.to(self.bag.dtype)


def _detection_evasion(
    context: _SelectionContext, *, index: np.ndarray, defence: Mapping[str, Any]
) -> Callable[[ObjectiveFn], ObjectiveFn]:
    """The objective's wrapper that penalises being flagged by ``knn_filter``: scored among the
    slide's other clean tiles, above the score that the filter's share of them exceeds."""
    features = torch.as_tensor(context.features(required_by="the adaptive attack on knn_filter"), dtype=torch.float32)
    threshold = threshold_at_fpr(knn_outlier_scores(features, k=defence["k"]).numpy(), fpr=defence["fraction"])
    others = torch.as_tensor(np.setdiff1d(np.arange(len(features)), index)).long()
    reference = features[others].to(context.device)
    return lambda fn: detection_aware(
        fn, reference=reference, k=defence["k"], threshold=threshold, weight=defence["detection_weight"]
    )


def _vulnerability_selection(context: _SelectionContext, *, k: int) -> sel.Selection:
    probe = sel.Probe(
        encoder=context.encoder,
        ball=context.method.ball,
        objective=context.objective.fn,
        device=context.device,
        precision=context.method.precision,
    )
    generator = torch.Generator().manual_seed(
        int(slide_rng(context.seed, context.slide_id, stream=PROBE_STREAM).integers(2**62))
    )
    scores, evaluations = sel.vulnerability_scores(
        context.tiles,
        probe=probe,
        # on CUDA the probe embeds its own reference (see vulnerability_scores): the store is not read
        reference=None if context.device.type == "cuda" else context.features(required_by=None),
        generator=generator,
        label=context.slide_id,
    )
    chosen = sel.top_k_selection(scores, k=k, what=f"{context.slide_id}: vulnerability")
    chosen.probe_tiles, chosen.probe_evaluations = len(scores), evaluations
    return chosen


def _attack_batch(
    encoder: TileEncoder,
    clean_uint8: np.ndarray,
    *,
    method: Method,
    objective_fn: ObjectiveFn,
    generator: torch.Generator,
    device: torch.device,
    label: str,
) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """The batch's store arrays, and the embeddings of its rounded adversarial tiles."""
    started = time.perf_counter()
    clean = to_unit_pixels(clean_uint8).to(device)
    # the reference and the rounded tiles' embeddings in the attack's own precision (its objective
    # compares like with like); evaluation compares re-embedded with stored features instead
    in_precision = functools.partial(forward_precision, encoder, device=device, mode=method.precision)
    with torch.no_grad(), in_precision():
        reference = encoder(clean).float()
    outcome = method(encoder=encoder, clean=clean, reference=reference, generator=generator, objective=objective_fn)
    clean_levels = channels_first(clean_uint8).to(device)
    adv_uint8 = method.ball.quantize(outcome.adversarial, clean_levels)
    with torch.no_grad(), in_precision():
        adversarial_embedding = encoder(adv_uint8.float() / 255).float()
    with torch.no_grad(), runtime.exact_arithmetic(device):
        after_rounding = objective_fn(adversarial_embedding, reference)
    delta = (adv_uint8.float() - clean_levels.float()).flatten(1) / 255  # exact grey-level steps
    log.info(
        "%s: %d tiles in %.2f s (%.2f s/tile, %d gradient evaluations each)",
        label,
        len(clean),
        time.perf_counter() - started,
        (time.perf_counter() - started) / len(clean),
        int(outcome.iterations[0]),
    )
    arrays = {
        "adv_tiles": adv_uint8.permute(0, 2, 3, 1).cpu().numpy(),
        "linf": delta.abs().amax(dim=1).cpu().numpy().astype(np.float32),
        "l2": delta.norm(dim=1).cpu().numpy().astype(np.float32),
        "objective_before_rounding": outcome.objective.cpu().numpy().astype(np.float32),
        "objective": after_rounding.cpu().numpy().astype(np.float32),
        "iterations": outcome.iterations.cpu().numpy().astype(np.int32),
        "best_step": outcome.best_step.cpu().numpy().astype(np.int32),
    }
    if outcome.masks is not None:  # masked methods (SNAP): the masks, so area and count can be checked
        masks = outcome.masks.cpu().numpy()
        arrays["masks"] = masks.astype(np.uint8)
        arrays["mask_area"] = masks.reshape(len(masks), -1).mean(axis=1).astype(np.float32)
        arrays["mask_blobs"] = outcome.blobs.cpu().numpy().astype(np.int32)
    return arrays, adversarial_embedding


def _attrs(
    *,
    slide_id: str,
    spec: dict[str, Any],
    encoder: TileEncoder,
    method: Method,
    n_tiles: int,
    chosen: sel.Selection,
    clean: np.ndarray,
    mil_head: MILHead | None,
) -> dict[str, Any]:
    radius = method.ball.radius_for(int(np.prod(clean.shape[1:])))
    head = {"mil_head": mil_head.provenance} if mil_head is not None and uses_mil_head(spec) else {}
    return {
        "slide_id": slide_id,
        "attack": spec,
        "encoder": encoder.describe(),
        "n_tiles": n_tiles,
        "k": len(chosen.index),
        "method_params": method_params(spec, where=f"attacks.{spec.get('name', '?')}", strict=False),
        "bound": {"norm": method.ball.norm, "eps": method.ball.eps, "radius": radius},
        "selection": {
            "strategy": spec["selection"],
            "probe_tiles": chosen.probe_tiles,
            "probe_gradient_evaluations": chosen.probe_evaluations,
        },
        "selection_probe_tiles": chosen.probe_tiles,
        **threat_marking(spec),
        **head,
    }
