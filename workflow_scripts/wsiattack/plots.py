"""Figures for the report: clean vs. attacked metrics, and example adversarial tiles."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    fig, axes = plt.subplots(
        len(groups), 3, figsize=(15, 3.8 * len(groups)), squeeze=False, gridspec_kw={"width_ratios": [3, 1, 1]}
    )
    for (encoder, mil), (ax, ax_flip, ax_shift) in zip([g[0] for g in groups], axes, strict=True):
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


def plot_examples(
    *,
    tile_stores: Sequence[str | Path],
    attack_stores: Sequence[str | Path],
    out_png: str | Path,
    slide_paths: Sequence[str | Path | None] | None = None,
) -> None:
    """For one attacked tile per slide: clean, adversarial (uint8 as stored), amplified difference.

    ``slide_paths`` (one per tiles store) say where the slides are now (default: as tiled)."""
    columns = []
    for tiles_path, attack_path, slide_path in zip(
        tile_stores, attack_stores, slide_paths or [None] * len(tile_stores), strict=True
    ):
        attack = stores.open_store(attack_path, kind=stores.ATTACK)
        index = int(attack["index"][0])
        with TileReader(tiles_path, slide_path=slide_path) as tiles:
            clean = tiles.read(np.array([index]))[0]
        adversarial = np.asarray(attack["adv_tiles"][0])
        diff = adversarial.astype(np.int16) - clean.astype(np.int16)
        scale = max(1, int(np.abs(diff).max()))
        amplified = ((diff / scale + 1) * 127.5).clip(0, 255).astype(np.uint8)
        # a shuffled control ran no encoder: it has no objective, but the share of clipped values
        score = "objective" if "objective" in attack else "clipped"
        title = f"{attack.attrs['slide_id']} tile {index}\n{score} {float(attack[score][0]):.3f}"
        mask = np.asarray(attack["masks"][0]) if "masks" in attack else None  # SNAP: outlined on the difference
        columns.append((title, clean, adversarial, amplified, scale, mask))
    fig, axes = plt.subplots(3, len(columns), figsize=(2.6 * len(columns), 8), squeeze=False)
    for col, (title, clean, adversarial, amplified, scale, mask) in enumerate(columns):
        for row, (image, label) in enumerate(
            ((clean, "clean"), (adversarial, "adversarial"), (amplified, f"difference x{255 // (2 * scale)}"))
        ):
            ax = axes[row, col]
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title if row == 0 else label, fontsize=8)
            if mask is not None and row == 2:
                ax.contour(mask, levels=[0.5], colors="yellow", linewidths=0.6)
            if col == 0:
                ax.set_ylabel(label)
    fig.tight_layout()
    _save(fig, out_png)


def factor_table(summary: pd.DataFrame, attacks: Mapping[str, Mapping]) -> pd.DataFrame:
    """One row per (encoder, mil, attack): its factors (method, eps in 255ths, budget fraction;
    variant = method · objective · selection) and its accuracy drop and flip rate with their 95 %
    intervals."""
    rows = []
    for (encoder, mil, attack), table in summary.groupby(["encoder", "mil", "attack"], sort=True):
        entry, by_metric = attacks[attack], table.set_index("metric")
        accuracy, flips = by_metric.loc["accuracy"], by_metric.loc["flip_rate"]
        rows.append(
            {
                "encoder": encoder,
                "mil": mil,
                "attack": attack,
                "method": entry["method"],
                "eps_255": round(entry["eps"] * 255, 2),
                "fraction": entry["budget"]["fraction"],
                "variant": " · ".join(
                    str(part)
                    for part in (entry["method"], entry.get("objective"), entry.get("selection", "random"))
                    if part
                ),
                "accuracy_drop": accuracy["drop"],
                "drop_low": accuracy["drop_ci_low"],
                "drop_high": accuracy["drop_ci_high"],
                # the summary's flip row stores drop = -flip rate, so its interval is mirrored
                "flip_rate": flips["attacked"],
                "flip_low": -flips["drop_ci_high"],
                "flip_high": -flips["drop_ci_low"],
            }
        )
    return pd.DataFrame(rows)


def plot_factors(summary: pd.DataFrame, attacks: Mapping[str, Mapping], out_png: str | Path) -> None:
    """Accuracy drop and flip rate against eps (at each variant's most used budget) and against
    the budget (at its most used eps), one row of panels per (encoder, MIL head), 95 % intervals.
    A variant is method · objective · selection: a gray-box oracle is never on a label-free curve."""
    table = factor_table(summary, attacks)
    groups = list(table.groupby(["encoder", "mil"], sort=True))
    fig, axes = plt.subplots(len(groups), 4, figsize=(17, 3.4 * len(groups)), squeeze=False)
    for ((encoder, mil), group), row in zip(groups, axes, strict=True):
        for axis_index, (factor, fixed, label) in enumerate(
            (("eps_255", "fraction", "eps (/255)"), ("fraction", "eps_255", "budget (fraction of tiles)"))
        ):
            for variant_index, (variant, rows) in enumerate(group.groupby("variant", sort=True)):
                level = rows[fixed].mode().iloc[0]
                curve = rows[rows[fixed] == level].groupby(factor).first().reset_index().sort_values(factor)
                for metric_index, (value, low, high) in enumerate(
                    (("accuracy_drop", "drop_low", "drop_high"), ("flip_rate", "flip_low", "flip_high"))
                ):
                    ax = row[2 * axis_index + metric_index]
                    yerr = np.vstack([curve[value] - curve[low], curve[high] - curve[value]]).clip(min=0)
                    ax.errorbar(
                        curve[factor],
                        curve[value],
                        yerr=np.nan_to_num(yerr),
                        marker="o",
                        capsize=3,
                        color=f"C{variant_index}",
                        linestyle="--" if variant.startswith("noise") else "-",
                        label=f"{variant} ({fixed.split('_')[0]} {level:g})",
                    )
                    ax.set_xlabel(label)
                    ax.set_ylabel("accuracy drop" if metric_index == 0 else "flip rate")
                    ax.set_title(f"{encoder} / {mil}", fontsize=9)
                    if factor == "fraction" and group["fraction"].nunique() > 2:
                        ax.set_xscale("log")
        for ax in row:
            ax.axhline(0, color="0.6", linewidth=0.8)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out_png)


def _weights_grid(coords: np.ndarray, side0_px: float, values: np.ndarray) -> np.ndarray:
    """Per-tile values on the tile grid (NaN where there is no tile), rows = y, columns = x."""
    cells = np.rint((coords - coords.min(axis=0)) / side0_px).astype(int)
    grid = np.full((cells[:, 1].max() + 1, cells[:, 0].max() + 1), np.nan)
    grid[cells[:, 1], cells[:, 0]] = values
    return grid


def plot_heatmaps(*, tile_weights_store: str | Path, tile_dirs: Sequence[str | Path], out_png: str | Path) -> None:
    """Per most affected slide: the head's tile weights before and after the attack (in units of
    the uniform weight 1/N, one colour scale per slide) and their change; attacked tiles boxed."""
    store = stores.open_store(tile_weights_store, kind=stores.TILE_WEIGHTS)
    slides = list(store.attrs["slides"])
    fig, axes = plt.subplots(max(1, len(slides)), 3, figsize=(13, 3.8 * max(1, len(slides))), squeeze=False)
    if not slides:
        axes[0, 0].set_title("no slides to draw")
    for slide_id, row in zip(slides, axes, strict=True):
        tiles = stores.open_store(stores.find_slide_store(tile_dirs, slide_id), kind=stores.TILES)
        coords, side0_px = np.asarray(tiles["coords"][...]), float(tiles.attrs["geometry"]["side0_px"])
        group, n = store[slide_id], len(coords)
        clean, attacked = (np.asarray(group[f"{name}_weights"][...]) * n for name in ("clean", "attacked"))
        index = np.asarray(group["index"][...])
        top = float(max(clean.max(), attacked.max()))
        change = attacked - clean
        limit = float(np.abs(change).max()) or 1.0
        panels = (
            (clean, "viridis", 0, top, "clean"),
            (attacked, "viridis", 0, top, "attacked"),
            (change, "RdBu_r", -limit, limit, "change"),
        )
        for ax, (values, cmap, low, high, title) in zip(row, panels, strict=True):
            image = ax.imshow(
                _weights_grid(coords, side0_px, values), cmap=cmap, vmin=low, vmax=high, interpolation="nearest"
            )
            cells = np.rint((coords[index] - coords.min(axis=0)) / side0_px)
            for x, y in cells:
                ax.add_patch(plt.Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(
                f"{slide_id} ({group.attrs['label']}): {title}"
                + ("" if title != "change" else f"\ntrue-class probability −{group.attrs['true_class_drop']:.3f}"),
                fontsize=9,
            )
            fig.colorbar(
                image, ax=ax, fraction=0.046, pad=0.02, label="weight × N" if title != "change" else "Δ weight × N"
            )
    fig.tight_layout()
    _save(fig, out_png)


def plot_vulnerability(table: pd.DataFrame, correlations: pd.DataFrame, out_png: str | Path, *, title: str) -> None:
    """Feature shift of each attacked tile against each content statistic, Spearman rho in the titles."""
    contents = list(correlations["content"])
    fig, axes = plt.subplots(
        1, max(1, len(contents)), figsize=(2.9 * max(1, len(contents)), 3.1), squeeze=False, sharey=True
    )
    for ax, record in zip(axes[0], correlations.to_dict("records"), strict=False):
        ax.scatter(table[record["content"]], table["cosine_distance"], s=10, alpha=0.7)
        ax.set_xlabel(record["content"].replace("_", " "))
        ax.set_title(f"ρ = {record['spearman_rho']:.2f} (p = {record['p_value']:.2g})", fontsize=9)
    axes[0, 0].set_ylabel("1 − cos(clean, attacked)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, out_png)


def plot_universal(pattern_stores: Sequence[str | Path], out_png: str | Path) -> None:
    """Each fold's universal pattern (offsets scaled to the full grey range: mid-grey = 0) and the
    training curves: the minibatch objective per step, and the rounded pattern's objective on all
    training tiles at each scoring (the kept one marked)."""
    groups = [stores.open_store(p, kind=stores.UNIVERSAL) for p in pattern_stores]
    fig, axes = plt.subplots(1, len(groups) + 1, figsize=(2.8 * (len(groups) + 1), 3.2), squeeze=False)
    curves = axes[0, -1]
    for ax, group in zip(axes[0, :-1], groups, strict=True):
        levels = np.asarray(group["pattern"][...], dtype=np.float32)
        radius = max(1.0, float(np.abs(levels).max()))
        ax.imshow(((levels / radius + 1) * 127.5).astype(np.uint8))
        ax.set_xticks([])
        ax.set_yticks([])
        fold, best = group.attrs["fold"], group.attrs["best_step"]
        ax.set_title(f"fold {fold}: ±{radius:.0f} grey levels\nkept step {best}", fontsize=8)
        train = np.asarray(group["train_objective"][...])
        (line,) = curves.plot(np.arange(1, len(train) + 1), train, lw=0.8)
        steps, values = np.asarray(group["eval_step"][...]), np.asarray(group["eval_objective"][...])
        curves.plot(steps, values, "o", ms=3, color=line.get_color(), label=f"fold {fold}")
        curves.plot([best], [values[list(steps).index(best)]], "*", ms=9, color=line.get_color())
    curves.set_xlabel("step")
    curves.set_ylabel("objective (training tiles)")
    curves.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out_png)


def plot_backdoor(table: pd.DataFrame, out_png: str | Path) -> None:
    """Per (encoder, MIL model, shots): CA and BA on non-target slides per trigger, a bar per
    target with its exact interval (the clean head's BA: the trigger on an honest head)."""
    panels = [("clean_accuracy", "clean accuracy (CA)"), ("backdoor_accuracy_non_target", "BA, non-target slides")]
    rows = table[table["target"] != "mean"]  # backdoortable.MEAN_TARGET: the average over targets
    groups = list(rows.groupby(["encoder", "mil", "shots"], sort=False))
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.4 * len(groups)), squeeze=False)
    for row, ((encoder, mil, shots), group) in enumerate(groups):
        triggers = list(dict.fromkeys(group["trigger"]))
        targets = list(dict.fromkeys(group["target"]))
        width = 0.8 / len(targets)
        for col, (metric, title) in enumerate(panels):
            ax = axes[row][col]
            for j, target in enumerate(targets):
                part = group[group["target"] == target].set_index("trigger").reindex(triggers)
                value = part[metric].to_numpy(dtype=float)
                errors = np.abs(part[[f"{metric}_ci_low", f"{metric}_ci_high"]].to_numpy(dtype=float).T - value)
                x = np.arange(len(triggers)) + (j - (len(targets) - 1) / 2) * width
                ax.bar(x, value, width, yerr=errors, capsize=3, label=f"target {target}")
            ax.set_xticks(range(len(triggers)), triggers)
            ax.set_ylim(0, 1.05)
            ax.set_title(f"{encoder} / {mil}, shots {shots}: {title}", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out_png)


def plot_backdoor_trigger(store_path: str | Path, out_png: str | Path) -> None:
    """A test tile clean and triggered (the quantised image the head saw), their difference
    scaled to the full grey range, and the patch."""
    group = stores.open_store(store_path, kind=stores.BACKDOOR)
    settings = group.attrs["spec"]["backdoor"]
    fig, axes = plt.subplots(1, 4, figsize=(11, 3.2))
    if "example_clean" in group:
        clean = np.asarray(group["example_clean"][...])
        triggered = np.asarray(group["example_triggered"][...])
        difference = triggered.astype(np.float32) - clean
        radius = max(1.0, float(np.abs(difference).max()))
        panels = [
            (clean, "clean tile"),
            (triggered, f"triggered ({settings['trigger']})"),
            (((difference / radius + 1) * 127.5).astype(np.uint8), f"difference, ±{radius:.0f} grey levels"),
        ]
    else:
        panels = [(None, "no triggered tile")] * 3
    panels.append((np.asarray(group["patch"][...]), f"patch ({group['patch'].shape[0]} px)"))
    for ax, (image, title) in zip(axes, panels, strict=True):
        if image is not None:
            ax.imshow(image, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"target {settings['target']}, shots {settings['shots']}, seed {settings['seed']}", fontsize=9)
    fig.tight_layout()
    _save(fig, out_png)


def plot_defences(table: pd.DataFrame, out_png: str | Path) -> None:
    """Per (encoder, MIL model), one panel per measure (accuracy, flip rate, p(true class), the
    perturbed tiles' embedding shift): each (defence, attack) without the defence, with it against
    the non-adaptive attack and against the adaptive one; each bar kind has one colour throughout."""
    bars = [
        ("clean", "clean, undefended"),
        ("clean_defended", "clean, defended"),
        ("attacked", "attacked, undefended"),
        ("attacked_nonadaptive", "attacked, defended (non-adaptive)"),
        ("attacked_adaptive", "attacked, defended (adaptive)"),
    ]
    colours = dict(zip((column for column, _ in bars), plt.get_cmap("tab10").colors, strict=False))
    metrics = ("accuracy", "flip_rate", "p_true_class", "tile_cosine_distance")
    groups = list(table.groupby(["encoder", "mil"], sort=False))
    n_pairs = max(len(group[group["metric"] == metrics[0]]) for _, group in groups)
    fig, axes = plt.subplots(
        len(groups) * len(metrics),
        1,
        figsize=(max(8.0, 0.9 * n_pairs + 2), 2.6 * len(metrics) * len(groups)),
        squeeze=False,
    )
    width = 0.8 / len(bars)
    for g, ((encoder, mil), group) in enumerate(groups):
        for m, metric in enumerate(metrics):
            ax = axes[g * len(metrics) + m][0]
            part = group[group["metric"] == metric]
            for j, (column, label) in enumerate(bars):
                if metric in ("flip_rate", "tile_cosine_distance") and column.startswith("clean"):
                    continue  # nothing to measure without an attack
                x = np.arange(len(part)) + (j - (len(bars) - 1) / 2) * width
                ax.bar(x, part[column].to_numpy(dtype=float), width, label=label, color=colours[column])
            labels = [f"{d} vs {a}" for d, a in zip(part["defence"], part["attack"], strict=True)]
            ax.set_xticks(range(len(part)), labels, fontsize=7, rotation=30, ha="right")
            if metric != "tile_cosine_distance":
                ax.set_ylim(0, 1.05)
            ax.set_title(f"{encoder} / {mil}: {metric}", fontsize=9)
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    _save(fig, out_png)
