"""The transfer matrix (surrogate × target) from the workflow's own ``summary.csv``.

One row per (transfer attack, target encoder, MIL head, metric) for the metrics a transfer
attack is judged by: the accuracy drop, the flip rate and the perturbed tiles' 1 − cos feature
distance. Next to the transfer value stand its controls on the same tiles: the white-box attack
on the target (the ceiling: the same entry without ``surrogate``), the shuffled-perturbation
control (when the ``transfer`` block made one) and the noise control (an attack under ``attacks``
with method noise and the same eps, budget, selection and seed, when there is one); and the
transfer value as a percentage of the white-box one (Bortsova et al.'s "% of the clean metric"
is the ``clean`` column of the summary).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from wsiattack.attacks.transfer import shuffled_name, transfer_name

TRANSFER_METRICS = ("accuracy", "flip_rate", "tile_cosine_distance")  # accuracy: its drop
COLUMNS = (
    "attack",
    "surrogate",
    "target",
    "mil",
    "metric",
    "transfer",
    "transfer_ci_low",
    "transfer_ci_high",
    "white_box",
    "shuffled",
    "noise",
    "percent_of_white_box",
)


def transfer_matrix(summary: pd.DataFrame, *, transfer: Mapping[str, Any], attacks: Mapping[str, Any]) -> pd.DataFrame:
    """The matrix rows (``COLUMNS``); a control the config does not have is NaN."""
    values = _values(summary)
    rows = []
    for attack in transfer["attacks"]:
        noise = _noise_control(attack, attacks)
        for surrogate in transfer["surrogates"]:
            name = transfer_name(attack, surrogate)
            for (target, mil, metric), value in values.get(name, {}).items():
                white = values.get(attack, {}).get((target, mil, metric), (np.nan,) * 3)[0]
                rows.append(
                    {
                        "attack": attack,
                        "surrogate": surrogate,
                        "target": target,
                        "mil": mil,
                        "metric": metric,
                        "transfer": value[0],
                        "transfer_ci_low": value[1],
                        "transfer_ci_high": value[2],
                        "white_box": white,
                        "shuffled": values.get(shuffled_name(name), {}).get((target, mil, metric), (np.nan,))[0],
                        "noise": values.get(noise, {}).get((target, mil, metric), (np.nan,))[0],
                        "percent_of_white_box": 100 * value[0] / white if white else np.nan,
                    }
                )
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _values(summary: pd.DataFrame) -> dict[str, dict[tuple[str, str, str], tuple[float, float, float]]]:
    """attack -> (encoder, mil, metric) -> (value, CI low, CI high): the accuracy drop with its
    bootstrap CI, the flip rate with its Clopper–Pearson CI, the tile cosine distance (no CI)."""
    out: dict[str, dict] = {}
    for row in summary[summary["metric"].isin(TRANSFER_METRICS)].to_dict("records"):
        if row["metric"] == "accuracy":
            value = (row["drop"], row["drop_ci_low"], row["drop_ci_high"])
        elif row["metric"] == "flip_rate":  # stored as its drop, minus the rate
            value = (row["attacked"], -row["drop_ci_high"], -row["drop_ci_low"])
        else:
            value = (row["attacked"], np.nan, np.nan)
        out.setdefault(row["attack"], {})[(row["encoder"], row["mil"], row["metric"])] = value
    return out


def _noise_control(attack: str, attacks: Mapping[str, Any]) -> str | None:
    entry = attacks[attack]
    same = ("eps", "budget", "selection", "seed")
    for name, other in attacks.items():
        if (
            other["method"] == "noise"
            and not other.get("surrogate")
            and all(other.get(k) == entry.get(k) for k in same)
        ):
            return name
    return None


def plot_transfer(matrix: pd.DataFrame, path) -> None:
    """Heatmaps, surrogate × target, of the tile cosine distance and the flip rate as % of white-box."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("tile_cosine_distance", "flip_rate")
    groups = list(matrix.groupby(["attack", "mil"])) or [(("none", "none"), matrix)]
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.8 * len(groups)), squeeze=False)
    for row, ((attack, mil), group) in enumerate(groups):
        for col, metric in enumerate(metrics):
            ax = axes[row][col]
            grid = group[group["metric"] == metric].pivot_table(
                index="surrogate", columns="target", values="percent_of_white_box", aggfunc="first"
            )
            image = ax.imshow(grid.to_numpy(dtype=float), cmap="viridis", vmin=0, vmax=100)
            ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=30, ha="right")
            ax.set_yticks(range(grid.shape[0]), grid.index)
            for (i, j), value in np.ndenumerate(grid.to_numpy(dtype=float)):
                ax.text(j, i, "n/a" if np.isnan(value) else f"{value:.0f} %", ha="center", va="center", color="w")
            ax.set_title(f"{attack} ({mil}): {metric}, % of white-box")
            ax.set_xlabel("target (evaluated)")
            ax.set_ylabel("surrogate (crafted on)")
            fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
