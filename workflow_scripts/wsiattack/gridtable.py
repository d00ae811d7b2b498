"""The factor grid of a sweep as markdown tables, from the workflow's own ``summary.csv``.

    python -m wsiattack.gridtable results/summary.csv --sweep tests/configs/factor_grid.yaml

One table per budget fraction and norm (and encoder × MIL model): rows are methods, columns
eps, each cell ``accuracy drop / flip rate / mean 1 − cos of the perturbed tiles' features``.
L∞ and L2 methods are never in one table: the same eps is a per-value bound in L∞ and the
radius eps·sqrt(3·T²) in L2, whose ball contains the whole L∞ box. The cells are
found through the sweep's own expansion (``wsiattack.attacks.sweep``), not by parsing names.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import yaml

from wsiattack.atomic import atomic_file
from wsiattack.attacks.params import attack_norm
from wsiattack.attacks.sweep import expand_sweep
from wsiattack.errors import ConfigError, run_cli

CELL_METRICS = ("accuracy", "flip_rate", "tile_cosine_distance")


def grid_cells(summary: pd.DataFrame, sweep: dict) -> pd.DataFrame:
    """One row per (encoder, mil, attack) of the sweep: method, eps (255ths), fraction and the
    cell's metrics (accuracy drop, flip rate, tile cosine distance)."""
    entries = expand_sweep(sweep)
    missing = sorted(set(entries) - set(summary["attack"]))
    if missing:
        raise ConfigError(
            f"summary has no rows for {len(missing)} sweep entries, e.g. {missing[0]!r}: run the sweep first"
        )
    rows = summary[summary["attack"].isin(entries)]
    wide = rows.pivot_table(
        index=["encoder", "mil", "attack"], columns="metric", values=["drop", "attacked"], aggfunc="first"
    )
    cells = pd.DataFrame(
        {
            "accuracy_drop": wide[("drop", "accuracy")],
            "flip_rate": wide[("attacked", "flip_rate")],
            "tile_cosine_distance": wide[("attacked", "tile_cosine_distance")],
        }
    ).reset_index()
    cells["method"] = [entries[a]["method"] for a in cells["attack"]]
    cells["eps_255"] = [round(entries[a]["eps"] * 255, 2) for a in cells["attack"]]
    cells["fraction"] = [entries[a]["budget"]["fraction"] for a in cells["attack"]]
    cells["norm"] = [attack_norm(entries[a]) for a in cells["attack"]]
    return cells


NORM_HEADINGS = {
    "linf": "L∞ ball: every value within eps of the clean tile",
    "l2": "L2 ball of radius eps·sqrt(3·T²) for T px tiles (6.1 at eps 4/255 and T = 224): it contains the whole L∞ box",
    "stain": "stain space: eps is sigma of the H, E, DAB concentrations' scale and shift (column headings: sigma·255)",
    "mask": "SNAP masks: eps is the masks' largest share of the tile's area (column headings: share·255)",
}


def markdown_tables(cells: pd.DataFrame, *, methods: list[str]) -> str:
    """Methods × eps per (encoder, mil, fraction, norm), in the sweep's order."""
    out = []
    cells = cells.assign(norm_order=cells["norm"].map({"linf": 0, "l2": 1, "stain": 2, "mask": 3}))  # L∞ first
    for (encoder, mil, fraction, _, norm), group in cells.groupby(["encoder", "mil", "fraction", "norm_order", "norm"]):
        eps = sorted(group["eps_255"].unique())
        out += [
            f"**{encoder} / {mil}, budget {fraction:g} of each slide's tiles, {NORM_HEADINGS[norm]}.** Cell: accuracy drop / flip rate / mean tile cosine distance.",
            "",
        ]
        out += ["| method | " + " | ".join(f"eps {e:g}/255" for e in eps) + " |", "|---|" + "---|" * len(eps)]
        by_cell = group.set_index(["method", "eps_255"])
        for method in (m for m in methods if m in set(group["method"])):
            values = [by_cell.loc[(method, e)] for e in eps]
            out.append(
                f"| {method} | "
                + " | ".join(
                    f"{v.accuracy_drop:+.2f} / {v.flip_rate:.2f} / {v.tile_cosine_distance:.3g}" for v in values
                )
                + " |"
            )
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summary", type=Path, help="the workflow's results/summary.csv")
    parser.add_argument("--sweep", type=Path, required=True, help="the config file holding the sweep block")
    parser.add_argument("--csv", type=Path, help="also write every cell's numbers here")
    args = parser.parse_args(argv)
    sweep = yaml.safe_load(args.sweep.read_text())["sweep"]
    cells = grid_cells(pd.read_csv(args.summary), sweep)
    if args.csv:
        with atomic_file(args.csv) as tmp:
            cells.to_csv(tmp, index=False)
    text = markdown_tables(cells, methods=list(sweep["methods"]))
    print(text)
    return text


if __name__ == "__main__":
    run_cli(main)
