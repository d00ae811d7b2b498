"""Figures for the report: clean vs. attacked metrics, and example adversarial tiles."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: clusters and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from wsiattack import stores  # noqa: E402
from wsiattack.tilereader import TileReader  # noqa: E402

METRICS = ("accuracy", "balanced_accuracy", "auroc", "f1_macro")


def _save(fig, path: str | Path) -> None:
    with stores.atomic_file(path) as tmp:
        # Fixed metadata so that the same results give the same bytes.
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def plot_metrics(summary: pd.DataFrame, out_png: str | Path) -> None:
    """One panel per (encoder, MIL model): grouped bars of clean vs. attacked per metric and attack."""
    groups = list(summary.groupby(["encoder", "mil"], sort=True))
    fig, axes = plt.subplots(len(groups), 3, figsize=(15, 3.8 * len(groups)), squeeze=False, gridspec_kw={"width_ratios": [3, 1, 1]})
    for (encoder, mil), (ax, ax_flip, ax_shift) in zip([g[0] for g in groups], axes):
        table = summary[(summary["encoder"] == encoder) & (summary["mil"] == mil)]
        attacks = sorted(table["attack"].unique())
        width = 0.8 / (len(attacks) + 1)
        x = np.arange(len(METRICS))
        clean = table[table["attack"] == attacks[0]].set_index("metric").loc[list(METRICS), "clean"]
        ax.bar(x, clean, width, color="0.7", label="clean")
        for i, attack in enumerate(attacks, start=1):
            rows = table[table["attack"] == attack].set_index("metric").loc[list(METRICS)]
            ax.bar(x + i * width, rows["attacked"], width, label=f"attacked: {attack}")
        ax.set_xticks(x + width * len(attacks) / 2, METRICS)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{encoder} / {mil}: clean vs. attacked")
        ax.legend(fontsize=8, loc="lower right")
        flips = table[table["metric"] == "flip_rate"].set_index("attack").loc[attacks, "attacked"]
        ax_flip.bar(range(len(attacks)), flips, color=[f"C{i}" for i in range(len(attacks))])
        ax_flip.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right", fontsize=8)
        ax_flip.set_ylim(0, max(0.05, float(flips.max()) * 1.2))
        ax_flip.set_title("flip rate")
        shifts = table[table["metric"] == "tile_cosine_distance"].set_index("attack").loc[attacks, "attacked"]
        ax_shift.bar(range(len(attacks)), shifts, color=[f"C{i}" for i in range(len(attacks))])
        ax_shift.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right", fontsize=8)
        ax_shift.set_yscale("log")
        ax_shift.set_title("1 − cos(clean, attacked)\nof the perturbed tiles")
    fig.tight_layout()
    _save(fig, out_png)


def plot_examples(*, tile_stores: Sequence[str | Path], attack_stores: Sequence[str | Path], out_png: str | Path, slide_paths: Sequence[str | Path | None] | None = None) -> None:
    """For one attacked tile per slide: clean, adversarial (uint8 as stored), amplified difference.

    ``slide_paths`` (one per tiles store) say where the slides are now (default: as tiled)."""
    columns = []
    for tiles_path, attack_path, slide_path in zip(tile_stores, attack_stores, slide_paths or [None] * len(tile_stores), strict=True):
        attack = stores.open_store(attack_path, kind=stores.ATTACK)
        index = int(attack["index"][0])
        with TileReader(tiles_path, slide_path=slide_path) as tiles:
            clean = tiles.read(np.array([index]))[0]
        adversarial = np.asarray(attack["adv_tiles"][0])
        diff = adversarial.astype(np.int16) - clean.astype(np.int16)
        scale = max(1, int(np.abs(diff).max()))
        amplified = ((diff / scale + 1) * 127.5).clip(0, 255).astype(np.uint8)
        title = f"{attack.attrs['slide_id']} tile {index}\nobjective {float(attack['objective'][0]):.3f}"
        columns.append((title, clean, adversarial, amplified, scale))
    fig, axes = plt.subplots(3, len(columns), figsize=(2.6 * len(columns), 8), squeeze=False)
    for col, (title, clean, adversarial, amplified, scale) in enumerate(columns):
        for row, (image, label) in enumerate(((clean, "clean"), (adversarial, "adversarial"), (amplified, f"difference x{255 // (2 * scale)}"))):
            ax = axes[row, col]
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title if row == 0 else label, fontsize=8)
            if col == 0:
                ax.set_ylabel(label)
    fig.tight_layout()
    _save(fig, out_png)
