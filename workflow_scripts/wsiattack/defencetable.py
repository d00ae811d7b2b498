"""The defences table: per (encoder, head, defence, attack, metric), the clean cost and the
robustness gain of the defence, non-adaptive and adaptive, with paired bootstrap intervals.

Inputs are per-slide evaluation tables (``evaluation.evaluate_attack``): the undefended one of
the attack and the defended ones of both modes. Each comparison is a paired table whose two
sides are two columns of those (``paired``), summarised by ``metrics.summarize_attack``, so its
interval resamples patients like every other interval of the workflow:

- clean cost = clean metric without the defence - with it (positive: the defence costs); for
  ``flip_rate``, the share of clean predictions the defence changes;
- gain = attacked metric with the defence - without it (positive: the defence helps), for the
  non-adaptive and the adaptive attack; for ``flip_rate`` and ``tile_cosine_distance`` (lower is
  better) the sign is turned;
- two continuous measures that move where no slide flips (``shift_rows``): ``p_true_class`` and
  the perturbed tiles' embedding shift ``tile_cosine_distance``;
- ``attack_moved``: the undefended attack moved the measure (its 95 % interval excludes 0);
- ``red_flag``: a defence whose adaptive attacker has its exact gradient (gaussian, median,
  reinhard), on a measure the undefended attack moved, where the adaptive attack hurts no more
  than the non-adaptive one: the adaptive attack is then suspect, not the defence strong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from wsiattack.defences.params import EXACT_GRADIENT_DEFENCES
from wsiattack.metrics import mean_difference, summarize_attack

SIDES = ("clean", "attacked")


def paired(first: pd.DataFrame, first_side: str, second: pd.DataFrame, second_side: str) -> pd.DataFrame:
    """A per-slide table whose "clean" side is ``first``'s ``first_side`` and "attacked" side is
    ``second``'s ``second_side`` (slides matched by id; both tables must hold the same slides)."""
    if set(first["slide_id"]) != set(second["slide_id"]):
        raise ValueError("paired: the two evaluations hold different slides; re-run the defended evaluation")
    second = second.set_index("slide_id").loc[first["slide_id"]].reset_index()
    out = first[["slide_id", "label", "label_idx"]].copy()
    for side, table, source in (("clean", first, first_side), ("attacked", second, second_side)):
        for column in [c for c in table.columns if c.startswith(f"{source}_")]:
            out[f"{side}{column[len(source) :]}"] = table[column].to_numpy()
    return out


def _summary(table: pd.DataFrame, **settings) -> pd.DataFrame:
    return summarize_attack(table, **settings).set_index("metric")


def defence_rows(
    *,
    undefended: pd.DataFrame,
    nonadaptive: pd.DataFrame,
    adaptive: pd.DataFrame,
    kind: str,
    classes: Sequence[str],
    n_bootstrap: int,
    seed: int,
    patients: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """One row per metric of one (encoder, head, defence, attack): the slide metrics, then the
    continuous measures ``p_true_class`` and ``tile_cosine_distance`` (``shift_rows``)."""
    settings = {"classes": classes, "n_bootstrap": n_bootstrap, "seed": seed, "patients": patients}
    plain, defended, adapted = (_summary(t, **settings) for t in (undefended, nonadaptive, adaptive))
    cost = _summary(paired(undefended, "clean", nonadaptive, "clean"), **settings)
    gains = {
        mode: _summary(paired(table, "attacked", undefended, "attacked"), **settings)
        for mode, table in (("nonadaptive", nonadaptive), ("adaptive", adaptive))
    }
    out = pd.DataFrame(index=plain.index)
    out["clean"], out["clean_defended"] = plain["clean"], defended["clean"]
    out[list(COST_COLUMNS)] = cost[["drop", "drop_ci_low", "drop_ci_high"]].to_numpy()
    flips = out.index == "flip_rate"
    # the flip rate's clean cost: the share of clean predictions the defence changes (its drop is minus that)
    out.loc[flips, list(COST_COLUMNS)] = 0.0 - cost.loc[flips, ["drop", "drop_ci_high", "drop_ci_low"]].to_numpy()
    out["attacked"] = plain["attacked"]
    out["attacked_nonadaptive"], out["attacked_adaptive"] = defended["attacked"], adapted["attacked"]
    for mode, gain in gains.items():
        # drop of the pair = defended - undefended attacked metric (the pair's "clean" side is the defended one)
        out[f"{mode}_gain"] = gain["drop"].where(~flips, plain["attacked"] - out[f"attacked_{mode}"])
        out[f"{mode}_gain_ci_low"] = gain["drop_ci_low"].where(~flips, np.nan)
        out[f"{mode}_gain_ci_high"] = gain["drop_ci_high"].where(~flips, np.nan)
    out["attack_moved"] = [
        moved(*values) for values in plain[["drop", "drop_ci_low", "drop_ci_high"]].itertuples(index=False)
    ]
    out = pd.concat([out, shift_rows(undefended, nonadaptive, adaptive, classes=classes, **_resampling(settings))])
    out["red_flag"] = _red_flags(out, kind=kind)
    for mode, table in (("nonadaptive", nonadaptive), ("adaptive", adaptive)):
        detected = table["detected"].sum() / table["k"].sum() if "detected" in table else np.nan
        out[f"detected_{mode}"] = detected
        out[f"detection_auroc_{mode}"] = table["detection_auroc"].mean() if "detection_auroc" in table else np.nan
    out["n_slides"] = plain["n_slides"].iloc[0]
    return out.rename_axis("metric").reset_index()


def _resampling(settings: Mapping) -> dict:
    return {key: settings[key] for key in ("n_bootstrap", "seed", "patients")}


def p_true_class(table: pd.DataFrame, side: str, *, classes: Sequence[str]) -> np.ndarray:
    """Per slide, the head's probability of the slide's true class on ``side`` (clean or attacked)."""
    probs = table[[f"{side}_prob_{name}" for name in classes]].to_numpy(dtype=np.float64)
    return probs[np.arange(len(table)), table["label_idx"].to_numpy(dtype=np.int64)]


def shift_rows(
    undefended: pd.DataFrame,
    nonadaptive: pd.DataFrame,
    adaptive: pd.DataFrame,
    *,
    classes: Sequence[str],
    n_bootstrap: int,
    seed: int,
    patients: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """The continuous measures, which move where no slide flips: ``p_true_class`` (mean over slides
    of the probability of the true class; higher is better, clean cost as for accuracy) and
    ``tile_cosine_distance`` (mean over slides of the perturbed tiles' 1 - cos between the clean
    and attacked embeddings the head sees, i.e. after a tile defence; lower is better, no clean
    cost). Costs and gains are paired differences over slides with patient-bootstrap intervals."""
    order = undefended["slide_id"]
    tables = {"attacked": undefended}
    tables.update(
        (f"attacked_{mode}", t.set_index("slide_id").loc[order].reset_index())
        for mode, t in (("nonadaptive", nonadaptive), ("adaptive", adaptive))
    )

    def difference(better: np.ndarray, worse: np.ndarray) -> list[float]:
        return list(
            mean_difference(better, worse, slide_ids=order, n_bootstrap=n_bootstrap, seed=seed, patients=patients)
        )

    def row(values: Mapping[str, np.ndarray], *, higher_is_better: bool) -> dict[str, float]:
        out = {name: float(v.mean()) for name, v in values.items()}
        sign = 1.0 if higher_is_better else -1.0
        if "clean" in values:
            out.update(zip(COST_COLUMNS, difference(values["clean"], values["clean_defended"]), strict=True))
        for mode in ("nonadaptive", "adaptive"):
            gain = difference(sign * values[f"attacked_{mode}"], sign * values["attacked"])
            out.update(zip(_gain_columns(mode), gain, strict=True))
        return out

    p_true = {name: p_true_class(t, "attacked", classes=classes) for name, t in tables.items()}
    p_true["clean"] = p_true_class(undefended, "clean", classes=classes)
    p_true["clean_defended"] = p_true_class(tables["attacked_nonadaptive"], "clean", classes=classes)
    shift = {name: t["tile_cosine_distance"].to_numpy(dtype=np.float64) for name, t in tables.items()}
    rows = {
        "p_true_class": row(p_true, higher_is_better=True),
        "tile_cosine_distance": {"clean": 0.0, "clean_defended": 0.0, **row(shift, higher_is_better=False)},
    }
    rows["p_true_class"]["attack_moved"] = moved(*difference(p_true["clean"], p_true["attacked"]))
    rows["tile_cosine_distance"]["attack_moved"] = moved(*difference(shift["attacked"], np.zeros(len(order))))
    return pd.DataFrame.from_dict(rows, orient="index")


COST_COLUMNS = ("clean_cost", "clean_cost_ci_low", "clean_cost_ci_high")


def _gain_columns(mode: str) -> tuple[str, str, str]:
    return (f"{mode}_gain", f"{mode}_gain_ci_low", f"{mode}_gain_ci_high")


def moved(value: float, low: float, high: float) -> bool:
    """Whether the undefended attack moved a measure: its 95 % interval excludes 0 (without an
    interval, n_bootstrap 0: its value is not 0)."""
    if np.isnan(low) or np.isnan(high):
        return bool(value != 0)
    return bool(low > 0 or high < 0)


def _red_flags(rows: pd.DataFrame, *, kind: str) -> pd.Series:
    """A defence whose adaptive attacker has its exact gradient, on a measure that the undefended
    attack moved (``attack_moved``), where the adaptive attack hurts no more than the non-adaptive
    one (a tie included). A measure the attack did not move (no slide flipped) cannot tell the
    two attackers apart: never flagged."""
    lower_is_better = rows.index.isin(["flip_rate", "tile_cosine_distance"])
    adaptive_no_worse = np.where(
        lower_is_better,
        rows["attacked_adaptive"] <= rows["attacked_nonadaptive"],
        rows["attacked_adaptive"] >= rows["attacked_nonadaptive"],
    )
    exact = kind in EXACT_GRADIENT_DEFENCES
    return pd.Series(exact & rows["attack_moved"].to_numpy(dtype=bool) & adaptive_no_worse, index=rows.index)


def defence_table(
    evaluations: Mapping[tuple[str, str, str, str, str], pd.DataFrame],
    undefended: Mapping[tuple[str, str, str], pd.DataFrame],
    *,
    defences: Mapping[str, Mapping],
    classes: Sequence[str],
    n_bootstrap: int,
    seed: int,
    patients: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Every (encoder, mil, defence, attack): ``evaluations`` keyed by (encoder, mil, defence,
    mode, attack), ``undefended`` by (encoder, mil, attack)."""
    parts = []
    pairs = sorted({(e, m, d, a) for e, m, d, _, a in evaluations})
    for encoder, mil, defence, attack in pairs:
        kind = defences[defence]["kind"]
        rows = defence_rows(
            undefended=undefended[encoder, mil, attack],
            nonadaptive=evaluations[encoder, mil, defence, "nonadaptive", attack],
            adaptive=evaluations[encoder, mil, defence, "adaptive", attack],
            kind=kind,
            classes=classes,
            n_bootstrap=n_bootstrap,
            seed=seed,
            patients=patients,
        )
        parts.append(rows.assign(encoder=encoder, mil=mil, defence=defence, kind=kind, attack=attack))
    table = pd.concat(parts, ignore_index=True)
    first = ["encoder", "mil", "defence", "kind", "attack", "metric"]
    return table[first + [c for c in table.columns if c not in first]]
