"""Benchmark: the attack stage (perturb + reembed) against clean extraction of the same slide.

    cd /work/main && .venv/bin/python tests/benchmarks/bench_attack.py [--tiles 10000] [--probe-tiles 2000]

In one run on the same machine, with the ``demo`` encoder (ViT-Ti/16) on the CPU:

1. writes one slide of ``--tiles`` random-texture 224 px tiles with ``wsiattack.stores``
   (the tiling rule's layout) — not timed;
2. clean extraction: ``extraction.extract_slide`` of the whole slide;
3. attack stage at a 0.1 % budget: ``perturb_slide`` (PGD, 10 steps of 1/255, eps 4/255,
   random selection) + ``reembed_slide`` of the k adversarial tiles;
4. the label-free ``vulnerability`` selection's probe (one forward + backward per tile, the
   clean features as reference) on the first ``--probe-tiles`` tiles of the same slide,
   reported per tile and extrapolated to the whole slide: it is a cost on top of the attack.

Reports the ratio attack stage / clean extraction (goal <= 5 %) and the probe's cost relative
to extraction, as JSON on stdout and in ``--out``. Not collected by pytest (not named test_*).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from wsiattack import stores
from wsiattack.attacks.methods import build_method
from wsiattack.attacks.perturb import perturb_slide
from wsiattack.attacks.selection import Probe, vulnerability_scores
from wsiattack.encoders.model import build_encoder
from wsiattack.extraction import extract_slide, reembed_slide

ROOT = Path(__file__).resolve().parents[2]

TILE_PX = 224
CPU = torch.device("cpu")
PGD = {
    "name": "bench_pgd",
    "method": "pgd",
    "objective": "cosine",
    "eps": 4 / 255,
    "steps": 10,
    "step_size": 1 / 255,
    "budget": {"fraction": 0.001, "min_tiles": 1},
    "selection": "random",
    "seed": 0,
}


def write_random_slide(path: Path, *, n_tiles: int, seed: int) -> None:
    """Blocky random colour fields plus fine noise, written chunk by chunk (memory stays small)."""
    rng = np.random.default_rng(seed)
    with stores.atomic_store(path, kind=stores.TILES, attrs={"slide_id": "bench", "tile_px": TILE_PX}) as group:
        array = stores.create_tiles_array(group, n_tiles=n_tiles, tile_px=TILE_PX)
        for start in range(0, n_tiles, 512):
            n = min(512, n_tiles - start)
            coarse = rng.integers(60, 230, size=(n, TILE_PX // 8, TILE_PX // 8, 3), dtype=np.int16)
            noise = rng.integers(-12, 13, size=(n, TILE_PX, TILE_PX, 3), dtype=np.int16)
            array[start : start + n] = np.clip(coarse.repeat(8, axis=1).repeat(8, axis=2) + noise, 0, 255).astype(
                np.uint8
            )
        stores.write_array(group, "coords", np.zeros((n_tiles, 2), dtype=np.int64))


def timed(fn, /, **kwargs) -> float:
    started = time.perf_counter()
    fn(**kwargs)
    return time.perf_counter() - started


def probe_seconds(*, tiles_path: Path, features_path: Path, encoder, n_tiles: int) -> float:
    """Wall time of the vulnerability probe over the first ``n_tiles`` tiles (clean features as reference)."""
    tiles = np.asarray(stores.open_store(tiles_path, kind=stores.TILES)["tiles"][:n_tiles])
    reference = np.asarray(stores.open_store(features_path, kind=stores.FEATURES)["features"][:n_tiles])
    method, objective = build_method(PGD)
    probe = Probe(encoder=encoder, ball=method.ball, objective=objective.fn, device=CPU)
    started = time.perf_counter()
    vulnerability_scores(
        tiles, probe=probe, reference=reference, generator=torch.Generator().manual_seed(0), label="bench"
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=10_000)
    parser.add_argument("--probe-tiles", type=int, default=2_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_attack"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_attack_result.json"))
    parser.add_argument("--keep", action="store_true", help="keep the generated stores")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tiles_path, features_path = work / "tiles.zarr", work / "features.zarr"
    write_random_slide(tiles_path, n_tiles=args.tiles, seed=0)
    encoder = build_encoder("demo")
    load_before = os.getloadavg()[0]

    extraction_s = timed(
        extract_slide,
        slide_id="bench",
        tiles_store=tiles_path,
        encoder=encoder,
        batch_size=args.batch_size,
        device=CPU,
        out_store=features_path,
    )
    perturb_s = timed(
        perturb_slide,
        slide_id="bench",
        tiles_store=tiles_path,
        encoder=encoder,
        spec=PGD,
        out_store=work / "attack.zarr",
        device=CPU,
    )
    reembed_s = timed(
        reembed_slide,
        slide_id="bench",
        attack_store=work / "attack.zarr",
        encoder=encoder,
        batch_size=args.batch_size,
        device=CPU,
        out_store=work / "reembedded.zarr",
    )
    probe_s = probe_seconds(
        tiles_path=tiles_path, features_path=features_path, encoder=encoder, n_tiles=args.probe_tiles
    )

    k = int(stores.open_store(work / "attack.zarr", kind=stores.ATTACK).attrs["k"])
    per_tile_extraction = extraction_s / args.tiles
    result = {
        "tiles": args.tiles,
        "k": k,
        "torch_threads": torch.get_num_threads(),
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "clean_extraction_s": round(extraction_s, 2),
        "perturb_s": round(perturb_s, 2),
        "reembed_s": round(reembed_s, 2),
        "attack_stage_over_extraction": round((perturb_s + reembed_s) / extraction_s, 4),
        "probe_tiles": args.probe_tiles,
        "probe_s": round(probe_s, 2),
        "probe_per_tile_over_extraction_per_tile": round(probe_s / args.probe_tiles / per_tile_extraction, 3),
        "probe_extrapolated_to_slide_s": round(probe_s / args.probe_tiles * args.tiles, 1),
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
