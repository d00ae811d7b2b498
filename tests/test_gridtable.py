"""The sweep's markdown tables come from summary.csv rows, found through the sweep's expansion."""

import pandas as pd
import pytest
from wsiattack.attacks.sweep import expand_sweep
from wsiattack.errors import ConfigError
from wsiattack.gridtable import grid_cells, markdown_tables

SWEEP = {"methods": ["noise", "pgd", "cw"], "eps": ["1/255", "4/255"], "fractions": [0.001, 0.01]}


def summary_of(entries: dict, *, skip: str | None = None) -> pd.DataFrame:
    rows = []
    for i, name in enumerate(entries):
        if name == skip:
            continue
        for metric, attacked, drop in (
            ("accuracy", 0.9, 0.1 * i),
            ("flip_rate", 0.05 * i, -0.05 * i),
            ("tile_cosine_distance", 0.001 * (i + 1), 0.0),
        ):
            rows.append(
                {
                    "encoder": "demo",
                    "mil": "abmil",
                    "attack": name,
                    "metric": metric,
                    "clean": 1.0,
                    "attacked": attacked,
                    "drop": drop,
                }
            )
    rows.append(
        {
            "encoder": "demo",
            "mil": "abmil",
            "attack": "other",
            "metric": "accuracy",
            "clean": 1.0,
            "attacked": 1.0,
            "drop": 0.0,
        }
    )
    return pd.DataFrame(rows)


def test_cells_carry_each_entrys_factors_and_metrics():
    entries = expand_sweep(SWEEP)
    cells = grid_cells(summary_of(entries), SWEEP).set_index("attack")
    assert len(cells) == 12 and "other" not in cells.index
    i = list(entries).index("pgd_eps4_f0.01_random")
    cell = cells.loc["pgd_eps4_f0.01_random"]
    assert (cell["method"], cell["eps_255"], cell["fraction"]) == ("pgd", 4.0, 0.01)
    assert cell["accuracy_drop"] == pytest.approx(0.1 * i) and cell["flip_rate"] == pytest.approx(0.05 * i)
    assert cell["tile_cosine_distance"] == pytest.approx(0.001 * (i + 1))


def test_markdown_has_one_table_per_budget_with_methods_as_rows():
    entries = expand_sweep(SWEEP)
    text = markdown_tables(grid_cells(summary_of(entries), SWEEP), methods=SWEEP["methods"])
    assert text.count("| method | eps 1/255 | eps 4/255 |") == 4  # two budgets x two norms
    tables = text.split("**")[1::2], text.split("**")[2::2]
    for heading, table in zip(*tables, strict=True):  # L2 (C&W) never shares a table with L∞ methods
        assert ("| cw |" in table) == ("L2 ball" in heading) and ("| pgd |" in table) == ("L∞ ball" in heading)
    first_budget = text.split("budget 0.01 of")[0]
    # pgd at f=0.001 is entries 4 (eps 1) and 6 (eps 4) of the expansion: drop 0.1 i, flips 0.05 i
    assert "| pgd | +0.40 / 0.20 / 0.005 | +0.60 / 0.30 / 0.007 |" in first_budget.splitlines()


def test_a_missing_entry_is_an_error_naming_it():
    entries = expand_sweep(SWEEP)
    with pytest.raises(ConfigError, match="pgd_eps1_f0.001_random"):
        grid_cells(summary_of(entries, skip="pgd_eps1_f0.001_random"), SWEEP)
