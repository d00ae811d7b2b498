"""Results table: accuracy drop, flip rate and tile cosine distance per method × eps × budget.

    cd /work/main && .venv/bin/python tests/benchmarks/attack_table.py /tmp/attack_table_inputs --out /tmp/attack_table

``INPUTS`` is a copy of a finished default run's ``results/``: ``tiles/``, ``features/{encoder}/``,
``mil/{encoder}/{mil}/fold*/model.safetensors`` and ``splits.csv``; nothing in it is written.
In one process, reusing those clean features and trained heads, for every method × eps ×
fraction (random selection, seed 0): ``perturb_slide`` on every slide, ``reembed_slide`` of the
k adversarial tiles, ``evaluation.evaluate_attack`` (each slide scored by the head of the fold
in which it is a test slide) and ``metrics.summarize_attack`` / ``metrics.embedding_shift``.
Writes ``cells.csv`` (every number) and ``table.md`` (markdown) under ``--out``.

Step counts are reduced so that the grid runs in about 20 minutes on 2 CPU cores (see
``METHODS``); pass ``--steps-scale 10`` for full-strength settings on a GPU.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workflow_scripts"))

from wsiattack import evaluation, metrics  # noqa: E402
from wsiattack.attacks.params import normalise_attack  # noqa: E402
from wsiattack.attacks.perturb import perturb_slide  # noqa: E402
from wsiattack.encoders.model import build_encoder  # noqa: E402
from wsiattack.extraction import reembed_slide  # noqa: E402
from wsiattack.mil import load_mil_checkpoint  # noqa: E402

CPU = torch.device("cpu")
EPS_255 = (1, 2, 4, 8)
FRACTIONS = (0.001, 0.01)
# Reduced step counts (CPU budget); step sizes follow from eps and steps (wsiattack.attacks.params).
METHODS = {
    "noise": {},
    "fgsm": {},
    "pgd": {"steps": 5},
    "mifgsm": {"steps": 5},
    "apgd": {"steps": 10},
    "cw": {"steps": 5, "binary_search_steps": 2, "lr": 0.05},
}
STEP_KEYS = ("steps",)


def attack_spec(method: str, *, eps_255: int, fraction: float, steps_scale: int) -> dict:
    params = {k: v * steps_scale if k in STEP_KEYS else v for k, v in METHODS[method].items()}
    name = f"{method}_eps{eps_255}_f{fraction:g}_random"
    entry = {"method": method, "objective": "cosine", "eps": eps_255 / 255, "budget": {"fraction": fraction, "min_tiles": 1}, "selection": "random", "seed": 0, **params}
    return {"name": name, **normalise_attack(entry, where=f"table.{name}")}


def run_cell(spec: dict, *, inputs: Path, work: Path, encoder, slides: list[str]) -> tuple[list[Path], float]:
    """Perturb + re-embed every slide; return the re-embedded stores and the wall time."""
    started, reembedded = time.perf_counter(), []
    for slide in slides:
        attack_store = work / "attacks" / spec["name"] / f"{slide}.zarr"
        perturb_slide(slide_id=slide, tiles_store=inputs / "tiles" / f"{slide}.zarr", encoder=encoder, spec=spec, out_store=attack_store, device=CPU)
        out = work / "reembedded" / spec["name"] / f"{slide}.zarr"
        reembed_slide(slide_id=slide, attack_store=attack_store, encoder=encoder, batch_size=32, device=CPU, out_store=out)
        reembedded.append(out)
    return reembedded, time.perf_counter() - started


def summarize(table: pd.DataFrame, *, classes: list[str], n_bootstrap: int) -> dict:
    summary = pd.concat([metrics.summarize_attack(table, classes=classes, n_bootstrap=n_bootstrap, seed=0), metrics.embedding_shift(table)]).set_index("metric")
    return {
        "accuracy_clean": summary.at["accuracy", "clean"], "accuracy_attacked": summary.at["accuracy", "attacked"],
        "accuracy_drop": summary.at["accuracy", "drop"], "accuracy_drop_ci_low": summary.at["accuracy", "drop_ci_low"], "accuracy_drop_ci_high": summary.at["accuracy", "drop_ci_high"],
        "flip_rate": summary.at["flip_rate", "attacked"], "tile_cosine_distance": summary.at["tile_cosine_distance", "attacked"],
        "n_slides": int(summary.at["accuracy", "n_slides"]), "k_total": int(table["k"].sum()),
    }


def markdown(cells: pd.DataFrame) -> str:
    lines = []
    for fraction in FRACTIONS:
        part = cells[cells["fraction"] == fraction]
        k_total = int(part["k_total"].iloc[0])
        lines += [f"**Budget {fraction:g} of each slide's tiles** ({k_total} tiles over {int(part['n_slides'].iloc[0])} slides; min 1 per slide). Cell: accuracy drop / flip rate / mean tile cosine distance.", ""]
        lines += ["| method | " + " | ".join(f"eps {e}/255" for e in EPS_255) + " |", "|---|" + "---|" * len(EPS_255)]
        for method in part["method"].unique():
            row = part[part["method"] == method].set_index("eps_255")
            lines.append(f"| {method} | " + " | ".join(f"{row.at[e, 'accuracy_drop']:+.2f} / {row.at[e, 'flip_rate']:.2f} / {row.at[e, 'tile_cosine_distance']:.3g}" for e in EPS_255) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", type=Path, help="copy of a finished run's results/ (tiles, features, mil, splits.csv)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/attack_table"))
    parser.add_argument("--encoder", default="demo")
    parser.add_argument("--mil", default="abmil")
    parser.add_argument("--n-bootstrap", type=int, default=200)
    parser.add_argument("--steps-scale", type=int, default=1, help="multiply the reduced step counts")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--resume", action="store_true", help="reuse the per-slide tables of cells an interrupted run finished")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no OpenMP spin on a shared 2-core machine)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    inputs, work = args.inputs, args.out / "work"
    models = sorted((inputs / "mil" / args.encoder / args.mil).glob("fold*/model.safetensors"))
    classes = load_mil_checkpoint(models[0])[1]["classes"]
    slides = sorted(pd.read_csv(inputs / "splits.csv", dtype={"slide_id": str})["slide_id"])
    features = [inputs / "features" / args.encoder / f"{s}.zarr" for s in slides]
    encoder = build_encoder(args.encoder)
    rows = []
    for method in args.methods:
        for eps_255 in EPS_255:
            for fraction in FRACTIONS:
                spec = attack_spec(method, eps_255=eps_255, fraction=fraction, steps_scale=args.steps_scale)
                per_slide = work / f"{spec['name']}.csv"
                if args.resume and per_slide.exists():  # finished by an interrupted earlier run
                    table, seconds = pd.read_csv(per_slide, dtype={"slide_id": str}), float("nan")
                else:
                    reembedded, seconds = run_cell(spec, inputs=inputs, work=work, encoder=encoder, slides=slides)
                    table = evaluation.evaluate_attack(splits_csv=inputs / "splits.csv", model_paths=models, feature_stores=features, reembedded_stores=reembedded, classes=classes)
                    table.to_csv(per_slide, index=False)
                rows.append({"method": method, "eps_255": eps_255, "fraction": fraction, "seconds": round(seconds, 1), "steps": spec.get("steps"), **summarize(table, classes=classes, n_bootstrap=args.n_bootstrap)})
                print(f"{spec['name']}: {rows[-1]}", flush=True)
    cells = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    cells.to_csv(args.out / "cells.csv", index=False)
    (args.out / "table.md").write_text(markdown(cells))
    print(markdown(cells))


if __name__ == "__main__":
    main()
