"""GPU check: the real extraction, attack and re-embedding path on one GPU, in each encoder's
safe precision, with random weights (no download). Run it as-is on a fresh machine with a GPU:

    make setup && .venv/bin/python tests/gpu/check.py             # UNI (ViT-L/16) and H-optimus-0 (ViT-g/14)
    .venv/bin/python tests/gpu/check.py --small                   # CPU-sized: demo encoder, few tiles (CI runs it)

For each encoder (registry architecture, random init): writes a pixel tiles store of synthetic
H&E tiles (``--tiles``), extracts them with ``extraction.extract_slide`` (tiles/s), then runs
PGD-L∞, PGD-L2 and C&W on ``--attack-tiles`` of them plus the two controls (±eps noise, and the
null control: the same tiles unmodified) with ``perturb_slide`` and ``reembed_slide``, and PGD-L∞
again with ``precision: tf32`` and ``precision: encoder`` (their objective, shift and time next to
float32's are printed, not checked), and checks:
every bound holds after uint8 rounding, every re-embedded feature is finite, the null control moves
features less than the noise control, each attack more than the noise control, and that an
ABMIL head trained on the GPU predicts as the one trained on the CPU does. Prints one
line per step and ``CHECK PASSED`` / ``CHECK FAILED``; exits non-zero on a failed check. Without
CUDA the full variant says so and exits 0 (nothing to check).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workflow_scripts"))

from wsiattack import extraction, runtime, stores  # noqa: E402
from wsiattack.attacks.perturb import perturb_slide  # noqa: E402
from wsiattack.config import check_attack_entry  # noqa: E402
from wsiattack.encoders import custom  # noqa: E402
from wsiattack.encoders.model import TileEncoder, build_architecture, build_encoder  # noqa: E402
from wsiattack.mil import MILTrainingSpec, predict_bag, train_mil  # noqa: E402
from wsiattack.synthetic import render_slide  # noqa: E402

TILE_PX = 224
EPS = "4/255"
FULL = {
    "encoders": ["uni", "h_optimus_0"],
    "tiles": 2048,
    "attack_tiles": 32,
    "batch_size": 64,
    "steps": 10,
    "cw_rounds": 2,
}
SMALL = {"encoders": ["demo"], "tiles": 48, "attack_tiles": 4, "batch_size": 16, "steps": 3, "cw_rounds": 2}


def attack_entries(*, k: int, n_tiles: int, steps: int, cw_rounds: int) -> dict[str, dict]:
    """The checked attacks, normalised like config entries; every one picks the same k tiles."""
    budget = {"fraction": k / n_tiles, "min_tiles": k, "max_tiles": k}
    raw = {
        "pgd_linf": {"method": "pgd", "eps": EPS, "steps": steps},
        # the fast-attack options: the same PGD with TF32 matmuls, and in the encoder's autocast dtype
        "pgd_linf_tf32": {"method": "pgd", "eps": EPS, "steps": steps, "precision": "tf32"},
        "pgd_linf_encoder": {"method": "pgd", "eps": EPS, "steps": steps, "precision": "encoder"},
        "pgd_l2": {"method": "pgd", "norm": "l2", "eps": EPS, "steps": steps},
        "cw": {"method": "cw", "eps": EPS, "steps": steps, "binary_search_steps": cw_rounds, "lr": 0.05},
        "noise": {"method": "noise", "eps": EPS},
        "null": {"method": "noise", "eps": 0},
    }
    return {
        name: {"name": name, **check_attack_entry({**entry, "budget": budget, "seed": 0}, where=f"check.{name}")}
        for name, entry in raw.items()
    }


def random_weights_encoder(name: str) -> TileEncoder:
    """The registry's architecture with its random initialisation (the real weights are gated).

    timm initialises layer scale (UNI, H-optimus: ``init_values`` 1e-5) so small that a random
    network's embedding barely depends on its input (1 − cos ~1e-12 under any perturbation):
    nothing to attack. The check sets those scales to 1, as training moves them away from 1e-5."""
    if name == "demo":
        return build_encoder("demo")
    spec = custom.resolve_spec(name)
    backbone = build_architecture(spec).float()
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(getattr(module, "gamma", None), torch.nn.Parameter):
                module.gamma.fill_(1.0)
    return (
        TileEncoder(spec, backbone, weights_id=f"random-init:{name}", weights_source="random init, layer scale 1")
        .eval()
        .requires_grad_(False)
    )


def synthetic_tiles(n_tiles: int, *, seed: int = 0) -> np.ndarray:
    """(n, 224, 224, 3) uint8 H&E-like tiles: crops of rendered tissue, flipped and rotated."""
    rng = np.random.default_rng(seed)
    image = render_slide(rng=rng, width_px=1792, height_px=1792, tumor=True, tumor_share=0.2)
    out = np.empty((n_tiles, TILE_PX, TILE_PX, 3), np.uint8)
    for i in range(n_tiles):
        y, x = rng.integers(0, image.shape[0] - TILE_PX, size=2)
        out[i] = np.rot90(image[y : y + TILE_PX, x : x + TILE_PX], k=int(rng.integers(4)))[
            :, :: 1 - 2 * int(rng.integers(2))
        ]
    return out


def write_pixel_store(path: Path, tiles: np.ndarray) -> Path:
    with stores.atomic_store(path, kind=stores.TILES, attrs={"slide_id": "check", "tile_px": TILE_PX}) as group:
        stores.create_tiles_array(group, n_tiles=len(tiles), tile_px=TILE_PX)[...] = tiles
        stores.write_array(group, "coords", np.zeros((len(tiles), 2), dtype=np.int64))
    return path


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return 1 - (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def check_encoder(name: str, *, settings: dict, device: torch.device, workdir: Path) -> list[str]:
    """Run the path for one encoder; return the failed checks."""
    failures: list[str] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    encoder = random_weights_encoder(name)
    n_params = sum(p.numel() for p in encoder.parameters())
    print(
        f"[{name}] {encoder.spec.architecture}, {n_params / 1e6:.1f} M parameters, precision {encoder.spec.precision} on {device}"
    )
    pixels = synthetic_tiles(settings["tiles"])
    tiles = write_pixel_store(workdir / f"{name}-tiles.zarr", pixels)
    features_path = workdir / f"{name}-features.zarr"
    started = time.perf_counter()
    extraction.extract_slide(
        slide_id="check",
        tiles_store=tiles,
        encoder=encoder,
        batch_size=settings["batch_size"],
        device=device,
        out_store=features_path,
    )
    _synchronise(device)
    seconds = time.perf_counter() - started
    clean = np.asarray(stores.open_store(features_path, kind=stores.FEATURES)["features"][...])
    print(
        f"[{name}] extraction: {len(clean)} tiles in {seconds:.1f} s = {len(clean) / seconds:.1f} tiles/s (batch {settings['batch_size']}, first batch included)"
    )
    if not np.isfinite(clean).all():
        failures.append(f"{name}: clean features not finite")
    failures += _check_mil_training(name, clean, device=device)
    shifts, objectives, seconds_of = {}, {}, {}
    for attack, spec in attack_entries(
        k=settings["attack_tiles"], n_tiles=settings["tiles"], steps=settings["steps"], cw_rounds=settings["cw_rounds"]
    ).items():
        attack_path, reembedded_path = workdir / f"{name}-{attack}.zarr", workdir / f"{name}-{attack}-reembedded.zarr"
        started = time.perf_counter()
        k = perturb_slide(
            slide_id="check", tiles_store=tiles, encoder=encoder, spec=spec, out_store=attack_path, device=device
        )
        _synchronise(device)
        attack_s = time.perf_counter() - started
        extraction.reembed_slide(
            slide_id="check",
            attack_store=attack_path,
            encoder=encoder,
            batch_size=settings["batch_size"],
            device=device,
            out_store=reembedded_path,
        )
        store, again = (
            stores.open_store(attack_path, kind=stores.ATTACK),
            stores.open_store(reembedded_path, kind=stores.REEMBEDDED),
        )
        index, features = np.asarray(store["index"][...]), np.asarray(again["features"][...])
        failures += _bound_failures(f"{name}/{attack}", store, spec, clean_tiles=pixels)
        if not np.isfinite(features).all():
            failures.append(f"{name}/{attack}: re-embedded features not finite")
        shifts[attack] = float(cosine_distance(features, clean[index]).mean())
        evaluations = int(np.asarray(store["iterations"][...]).max()) if len(index) else 0
        objectives[attack], seconds_of[attack] = float(np.asarray(store["objective"][...]).mean()), attack_s
        print(
            f"[{name}] {attack:>16}: {k} tiles in {attack_s:.1f} s = {k / attack_s:.2f} tiles/s ({evaluations} gradient evaluations each); objective {objectives[attack]:.4g}; re-embedded 1 − cos {shifts[attack]:.3g}"
        )
    for fast in ("pgd_linf_tf32", "pgd_linf_encoder"):  # reported, not checked: what the fast options cost
        print(
            f"[{name}] {fast} vs pgd_linf: objective × {objectives[fast] / objectives['pgd_linf']:.3f}, re-embedded shift × {shifts[fast] / shifts['pgd_linf']:.3f}, time × {seconds_of[fast] / seconds_of['pgd_linf']:.2f}"
        )
    if device.type == "cuda":  # what a GPU needs for this encoder (SLURM requests host memory only)
        print(f"[{name}] peak GPU memory allocated: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB")
    if not shifts["null"] < shifts["noise"]:
        failures.append(
            f"{name}: the null control moved features ({shifts['null']:.3g}) no less than the noise control ({shifts['noise']:.3g}): precision or batch composition alone shifts them"
        )
    failures += [
        f"{name}/{a}: shift {shifts[a]:.3g} not above the noise control's {shifts['noise']:.3g}"
        for a in ("pgd_linf", "pgd_l2", "cw")
        if not shifts[a] > shifts["noise"]
    ]
    return failures


def _check_mil_training(name: str, features: np.ndarray, *, device: torch.device) -> list[str]:
    """train_mil's device path: an ABMIL head on 16 bags of the clean features, trained on
    ``device`` and on the CPU from the same seed, must predict alike (float rounding apart)."""
    bags = [torch.from_numpy(bag) for bag in np.array_split(features, 16)]
    labels = [i % 2 for i in range(len(bags))]
    spec = MILTrainingSpec(model="abmil", epochs=3, lr=1e-4, weight_decay=0.0, seed=0, hparams={})
    started = time.perf_counter()
    heads = {
        str(d): train_mil(bags=bags, labels=labels, n_classes=2, spec=spec, device=d).model for d in (device, "cpu")
    }
    seconds = time.perf_counter() - started
    gap = max(
        float(np.abs(predict_bag(heads[str(device)], bag)[0] - predict_bag(heads["cpu"], bag)[0]).max()) for bag in bags
    )
    print(
        f"[{name}] MIL training on {device} and on cpu (16 bags, 3 epochs, {seconds:.1f} s): largest probability gap {gap:.2g}"
    )
    return [] if gap < 1e-2 else [f"{name}: the head trained on {device} predicts {gap:.3g} away from the CPU's"]


def _bound_failures(label: str, store, spec: dict, *, clean_tiles: np.ndarray) -> list[str]:
    """The bound, exactly: in whole grey levels, from the stored uint8 tiles (float32 norms of
    150 528 values carry ~1e-5 of rounding)."""
    eps = float(spec["eps"])
    index = np.asarray(store["index"][...])
    levels = np.asarray(store["adv_tiles"][...]).astype(np.int64) - clean_tiles[index].astype(np.int64)
    if spec["method"] == "cw" or spec.get("norm") == "l2":
        budget = math.floor((eps * math.sqrt(levels[0].size) * 255) ** 2 + 1e-6)  # squared grey levels
        worst = int((levels.reshape(len(index), -1) ** 2).sum(axis=1).max())
        return [f"{label}: {worst} squared grey levels over the L2 budget {budget}"] if worst > budget else []
    worst, allowed = int(np.abs(levels).max()), int(eps * 255 + 1e-6)
    return [f"{label}: {worst} grey levels over the L∞ bound {allowed}"] if worst > allowed else []


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU-sized: the demo encoder on a few tiles")
    parser.add_argument("--encoders", nargs="+", help="registry names (default: uni h_optimus_0; --small: demo)")
    parser.add_argument("--tiles", type=int)
    parser.add_argument("--attack-tiles", type=int)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    settings = dict(SMALL if args.small else FULL)
    settings.update(
        {
            key: value
            for key, value in (("encoders", args.encoders), ("tiles", args.tiles), ("attack_tiles", args.attack_tiles))
            if value
        }
    )
    device = runtime.resolve_device("cpu" if args.small and args.device == "auto" else args.device)
    if not args.small and device.type != "cuda":
        print("no CUDA device: the full check has nothing to check here (run with --small for the CPU-sized variant)")
        return 0
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="wsiattack-gpu-check-") as scratch:
        failures = [
            f
            for name in settings["encoders"]
            for f in check_encoder(name, settings=settings, device=device, workdir=Path(scratch))
        ]
    for failure in failures:
        print(f"FAILED: {failure}")
    print("CHECK FAILED" if failures else "CHECK PASSED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
