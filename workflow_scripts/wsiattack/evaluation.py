"""Clean-vs-attacked evaluation of each test slide with its fold's MIL head (training: ``mil.folds``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from wsiattack import stores
from wsiattack.attacks.params import threat_marking
from wsiattack.defences.aggregation import defended_head
from wsiattack.defences.detection import slide_detection
from wsiattack.mil import load_mil_checkpoint, predict_bag
from wsiattack.mil.folds import read_features, usable

log = logging.getLogger(__name__)

MARKING_COLUMNS = ("label_free", "threat_model", "surrogate")  # per-slide CSV and summary: who may run the attack


def attacked_bag(clean: np.ndarray, *, index: np.ndarray, replacement: np.ndarray) -> np.ndarray:
    """The clean bag with the k perturbed rows swapped in (assembled at evaluation time)."""
    bag = clean.copy()
    bag[index] = replacement
    return bag


def evaluate_attack(
    *,
    splits_csv: str | Path,
    model_paths: Sequence[str | Path],
    feature_stores: Sequence[str | Path],
    reembedded_stores: Sequence[str | Path],
    classes: Sequence[str],
    defence: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """One row per slide, scored by the head of the fold in which it is a test slide.

    Every row carries the attack's ``label_free`` and ``threat_model`` (``params.threat_marking``
    of the attack spec the stores were made with), so gray-box results cannot pass for label-free.
    ``defence`` (rule evaluate_defended): a head defence wraps every head; with ``knn_filter``
    each row also says how many perturbed tiles the detector drops and its in-slide AUROC.
    """
    splits = pd.read_csv(splits_csv, dtype={"slide_id": str})
    features = read_features(feature_stores)
    replaced = {stores.slide_id_of(p): stores.open_store(p, kind=stores.REEMBEDDED) for p in reembedded_stores}
    models = {}
    for path in model_paths:
        model, meta = load_mil_checkpoint(Path(path))
        models[meta["fold"]] = defended_head(model, defence)
    rows = []
    for record in usable(splits, features).to_dict("records"):
        slide_id = record["slide_id"]
        clean = features[slide_id]
        index = np.asarray(replaced[slide_id]["index"][...])
        attacked = attacked_bag(clean, index=index, replacement=np.asarray(replaced[slide_id]["features"][...]))
        model = models[record["fold"]]
        shift = _cosine_distance(clean[index], attacked[index])
        attrs = replaced[slide_id].attrs
        marking = threat_marking(attrs["attack"], encoder=attrs.get("encoder"))
        rows.append(
            {
                **_score(model, clean, attacked, index=index, classes=classes),
                "tile_cosine_distance": shift,
                **achieved_distances(replaced[slide_id]),
                "slide_id": slide_id,
                "fold": record["fold"],
                "label": record["label"],
                "label_idx": list(classes).index(record["label"]),
                "n_tiles": len(clean),
                "k": len(index),
                **marking,
                **_detection(attacked, index=index, defence=defence),
            }
        )
    columns = ["slide_id", "fold", "label", "label_idx", "n_tiles", "k", *MARKING_COLUMNS]
    table = pd.DataFrame(rows)
    return table[columns + [c for c in table.columns if c not in columns]]


def _detection(bag: np.ndarray, *, index: np.ndarray, defence: Mapping[str, Any] | None) -> dict[str, Any]:
    if not defence or defence["kind"] != "knn_filter" or len(index) == 0:
        return {}
    return slide_detection(bag, index=index, fraction=defence["fraction"], k=defence["k"])


def true_class_drop(table: pd.DataFrame, *, classes: Sequence[str]) -> pd.Series:
    """Per slide: clean minus attacked probability of its true class (positive = the attack worked)."""
    clean = np.array([table.at[i, f"clean_prob_{label}"] for i, label in zip(table.index, table["label"], strict=True)])
    attacked = np.array(
        [table.at[i, f"attacked_prob_{label}"] for i, label in zip(table.index, table["label"], strict=True)]
    )
    return pd.Series(clean - attacked, index=table.index, name="true_class_drop")


def write_most_affected_weights(
    *,
    table: pd.DataFrame,
    model_paths: Sequence[str | Path],
    feature_dirs: Sequence[str | Path],
    reembedded_dirs: Sequence[str | Path],
    classes: Sequence[str],
    n_slides: int,
    out_store: str | Path,
) -> None:
    """The head's tile weights on the clean and the attacked bag of the ``n_slides`` slides whose
    true class lost most probability (ties: slide order), for the heatmaps; one group per slide."""
    drop = true_class_drop(table, classes=classes)
    chosen = (
        table.assign(true_class_drop=drop).sort_values("true_class_drop", ascending=False, kind="stable").head(n_slides)
    )
    models = {meta["fold"]: model for model, meta in map(load_mil_checkpoint, map(Path, model_paths))}
    attrs = {"slides": list(chosen["slide_id"]), "ranking": "clean minus attacked probability of the true class"}
    with stores.atomic_store(out_store, kind=stores.TILE_WEIGHTS, attrs=attrs) as group:
        for record in chosen.to_dict("records"):
            slide_id = record["slide_id"]
            clean = np.asarray(
                stores.open_store(stores.find_slide_store(feature_dirs, slide_id), kind=stores.FEATURES)["features"][
                    ...
                ]
            )
            replaced = stores.open_store(stores.find_slide_store(reembedded_dirs, slide_id), kind=stores.REEMBEDDED)
            index = np.asarray(replaced["index"][...])
            attacked = attacked_bag(clean, index=index, replacement=np.asarray(replaced["features"][...]))
            slide = group.create_group(slide_id)
            slide.attrs.update(
                {
                    "label": record["label"],
                    "fold": int(record["fold"]),
                    "true_class_drop": float(record["true_class_drop"]),
                }
            )
            for name, bag in (("clean", clean), ("attacked", attacked)):
                stores.write_array(
                    slide,
                    f"{name}_weights",
                    predict_bag(models[record["fold"]], torch.from_numpy(bag))[1].astype(np.float32),
                )
            stores.write_array(slide, "index", index)


def _score(
    model, clean: np.ndarray, attacked: np.ndarray, *, index: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for name, bag in (("clean", clean), ("attacked", attacked)):
        prob, attention = predict_bag(model, torch.from_numpy(bag))
        row[f"{name}_pred"] = int(np.argmax(prob))
        row.update({f"{name}_prob_{c}": float(p) for c, p in zip(classes, prob, strict=True)})
        row[f"{name}_attention_on_perturbed"] = float(attention[index].sum())
    return row


def achieved_distances(reembedded) -> dict[str, float]:
    """The slide's largest L-inf and mean RMS pixel change of its stored perturbed tiles (NaN if
    none, or for a store written before they were kept in it)."""
    out = {}
    for name, reduce in (("linf", np.max), ("rms", np.mean)):
        values = np.asarray(reembedded[name][...]) if name in reembedded else np.empty(0)
        out[f"tile_{name}"] = float(reduce(values)) if len(values) else float("nan")
    return out


def _cosine_distance(clean: np.ndarray, attacked: np.ndarray) -> float:
    """Mean 1 − cos between the clean and the attacked features of the perturbed tiles."""
    dot = (clean * attacked).sum(axis=1)
    norms = np.linalg.norm(clean, axis=1) * np.linalg.norm(attacked, axis=1)
    return float(np.mean(1.0 - dot / np.maximum(norms, 1e-12)))
