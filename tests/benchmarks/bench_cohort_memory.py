"""Benchmark: peak memory of `evaluate` and `train_mil` at two cohort sizes.

    cd /work/main && .venv/bin/python tests/benchmarks/bench_cohort_memory.py [--slides 20 80] [--tiles 4000] [--dim 512]

Writes a synthetic cohort (features stores of ``--tiles`` x ``--dim`` float32 per slide, re-embedded
stores of 4 rows, a 5-fold splits table, one ABMIL head per fold saved untrained), then, for each
cohort size and in a fresh process each, runs ``evaluation.evaluate_attack`` over every slide and
``folds.train_fold`` for fold 0 (2 epochs) and reports the process's peak RSS. Both read one
slide's bag at a time (``mil.folds.FeatureBags``), so the peak should not grow with the cohort;
the size of one bag and of the whole cohort's features are printed beside it for scale. The
``-eager`` rows read every bag up front, as both did before, to show what the bench detects.

Not collected by pytest (not named test_*).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from wsiattack import stores
from wsiattack.mil import build_mil_model
from wsiattack.mil.training import save_mil_checkpoint

CLASSES = ["normal", "tumor"]
FOLDS = 5
STAGES = ("evaluate", "train_mil", "evaluate-eager", "train_mil-eager")


def write_cohort(
    root: Path, *, n_slides: int, n_tiles: int, dim: int, folds: int = FOLDS, k: int = 4
) -> dict[str, object]:
    """``n_slides`` features stores, their re-embedded stores (``k`` rows), splits, one head per fold
    (also tests/test_cohort_streaming.py's cohort)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_slides):
        slide_id = f"s{i:05d}"
        with stores.atomic_store(root / "features" / f"{slide_id}.zarr", kind=stores.FEATURES, attrs={}) as group:
            stores.write_array(group, "features", rng.standard_normal((n_tiles, dim), dtype=np.float32))
        attrs = {"attack": {"selection": "random", "objective": "cosine"}, "encoder": "bench"}
        with stores.atomic_store(
            root / "reembedded" / f"{slide_id}.zarr", kind=stores.REEMBEDDED, attrs=attrs
        ) as group:
            stores.write_array(group, "index", np.arange(k, dtype=np.int64))
            stores.write_array(group, "features", rng.standard_normal((k, dim), dtype=np.float32))
        rows.append({"slide_id": slide_id, "patient_id": slide_id, "label": CLASSES[i % 2], "fold": i % folds})
    pd.DataFrame(rows).to_csv(root / "splits.csv", index=False)
    models = []
    for fold in range(folds):
        path = root / "models" / f"fold{fold}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        model = build_mil_model("abmil", in_dim=dim, n_classes=len(CLASSES))
        save_mil_checkpoint(path, model=model, meta={"fold": fold, "classes": CLASSES})
        models.append(str(path))
    return {"root": str(root), "models": models}


def measure(cohort: dict[str, object], stage: str) -> float:
    """Peak RSS (MB) of a fresh process that runs ``stage`` on the cohort."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", stage, json.dumps(cohort)], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def child(stage: str, cohort: dict[str, object]) -> None:
    from wsiattack import evaluation
    from wsiattack.evaluation import evaluate_attack
    from wsiattack.mil import folds
    from wsiattack.mil.folds import train_fold

    if stage.endswith("-eager"):  # the behaviour before FeatureBags: every bag read up front
        stage = stage.removesuffix("-eager")
        eager = lambda paths: dict(folds.FeatureBags(paths))  # noqa: E731
        folds.read_features = evaluation.read_features = eager

    root = Path(cohort["root"])
    features = stores.slide_stores([root / "features"])
    if stage == "evaluate":
        evaluate_attack(
            splits_csv=root / "splits.csv",
            model_paths=cohort["models"],
            feature_stores=features,
            reembedded_stores=stores.slide_stores([root / "reembedded"]),
            classes=CLASSES,
        )
    else:
        spec = {
            "fold": 0,
            "model": "abmil",
            "epochs": 2,
            "lr": 1e-4,
            "weight_decay": 0.0,
            "seed": 0,
            "patience": 10,
            "val_fraction": 0.2,
            "classes": CLASSES,
        }
        train_fold(splits_csv=root / "splits.csv", feature_stores=features, spec=spec, out_model=root / "trained.pt")
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, nargs=2, default=[20, 80])
    parser.add_argument("--tiles", type=int, default=4000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], json.loads(args.child[1]))
        return
    bag_mb = args.tiles * args.dim * 4 / 2**20
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.slides:
            cohort = write_cohort(Path(tmp) / str(n), n_slides=n, n_tiles=args.tiles, dim=args.dim)
            for stage in STAGES:
                results[stage, n] = measure(cohort, stage)
                print(
                    f"{stage:15s} {n:5d} slides (features {n * bag_mb:7.0f} MB, one bag {bag_mb:.1f} MB): "
                    f"peak RSS {results[stage, n]:7.0f} MB",
                    flush=True,
                )
    small, large = args.slides
    for stage in STAGES:
        print(
            f"RESULT {stage}: peak RSS {results[stage, small]:.0f} MB at {small} slides, "
            f"{results[stage, large]:.0f} MB at {large} (ratio {results[stage, large] / results[stage, small]:.2f}; "
            f"features {large / small:.0f}x)"
        )


if __name__ == "__main__":
    main()
