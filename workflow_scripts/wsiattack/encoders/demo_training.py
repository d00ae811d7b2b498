"""Train the ``demo_trained`` encoder: a small ViT, supervised on synthetic tiles.

    python -m wsiattack.encoders.demo_training --out demo_trained.safetensors [--seed 0]

Why supervised: it is deterministic, takes minutes on two CPU cores and needs no pretext-task
tuning, and it gives what the benchmark needs from a foundation model: a network trained on
tissue whose features separate tissue classes. The honest limitation: it was taught the demo's
own tumour class, which a self-supervised FM never sees, so it flatters the tumour signal.

Each tile is labelled from the generator's level-0 masks (background / normal / tumour) and
also regresses its tumour fraction. Supervision alone collapses the features onto the three
classes and makes them smoother than random weights (PGD at 4/255 moved them about 5x less than
``demo``'s), so a SimCLR-style instance-discrimination term between two augmented views of each
tile (the objective family of self-supervised FMs) keeps the within-class detail that makes
trained features fragile.

Training slides come from ``wsiattack.synthetic``'s encoder-training stream (tag
``ENCODER_TRAINING_STREAM``), never the demo cohort's, in two splits of slides: training and
held-out. The backbone is the registry's ``demo_trained`` architecture trained through the
registry's own wrapper (ImageNet normalisation, CLS read-out), so the checkpoint holds exactly
what ``build_encoder`` loads.

Same seed and thread count on one machine: identical bytes. Across CPUs torch's kernels differ
in the last bits, which training amplifies: features of a retrained encoder then agree with the
committed one closely, not bit for bit (the tolerance is in tests/test_demo_encoder.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from wsiattack.atomic import atomic_file
from wsiattack.encoders.model import TileEncoder, build_architecture
from wsiattack.encoders.registry import get_spec
from wsiattack.errors import run_cli
from wsiattack.synthetic import ENCODER_TRAINING_STREAM, render_slide_with_masks

log = logging.getLogger(__name__)

ENCODER = "demo_trained"
MODULE = "wsiattack.encoders.demo_training"
TILE_PX = 224
CLASSES = ("background", "normal", "tumour")
# Tile classes by mask fraction; 0.5 tissue is the workflow's default tissue.min_fraction.
MIN_TISSUE_FRACTION = 0.5
MIN_TUMOR_FRACTION = 0.5
# Slide splits within the training stream: (seed, tag, split, slide).
TRAIN_SPLIT, HELD_OUT_SPLIT, EVALUATION_SPLIT = 0, 1, 2
_AUGMENT_STREAM = 9  # the batch order and augmentation draws, apart from the slides'


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    seed: int = 0
    n_slides: int = 40
    n_held_out_slides: int = 8
    tiles_per_slide: int = 48
    slide_px: int = 2240
    steps: int = 300
    batch_size: int = 16  # tiles per step, each in two augmented views
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    tumor_fraction_weight: float = 0.5  # weight of the auxiliary tumour-fraction loss
    contrastive_weight: float = 1.0
    temperature: float = 0.1  # of the contrastive loss
    projection_dim: int = 64
    threads: int = 2


@dataclass(frozen=True)
class TileSet:
    pixels: np.ndarray  # (N, 224, 224, 3) uint8
    labels: np.ndarray  # (N,) int64 index into CLASSES
    tumor_fraction: np.ndarray  # (N,) float32


class TrainingHeads(nn.Module):
    """What training reads from the CLS embedding; discarded afterwards.

    ``classify``: class logits and a tumour-fraction logit; ``project``: the contrastive space.
    """

    def __init__(self, *, embed_dim: int, projection_dim: int):
        super().__init__()
        self.classify = nn.Linear(embed_dim, len(CLASSES) + 1)
        self.project = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, projection_dim))


@dataclass(frozen=True)
class TrainingResult:
    backbone: nn.Module
    final_loss: float
    held_out_accuracy: float  # three classes
    held_out_tumor_accuracy: float  # tumour vs normal, tissue tiles only
    n_train_tiles: int


# --- tiles ----------------------------------------------------------------------------------------


def render_tiles(
    *, seed: int, split: int, n_slides: int, tiles_per_slide: int, slide_px: int, threads: int = 1
) -> TileSet:
    """Tiles of ``n_slides`` slides of one split, two thirds of the slides with tumour."""

    def one(i: int) -> TileSet:
        return _slide_tiles(seed=seed, split=split, index=i, n_tiles=tiles_per_slide, slide_px=slide_px)

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:  # one generator per slide: order-free
        parts = list(pool.map(one, range(n_slides)))
    return TileSet(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("pixels", "labels", "tumor_fraction")))


def _slide_tiles(*, seed: int, split: int, index: int, n_tiles: int, slide_px: int) -> TileSet:
    key = (seed, ENCODER_TRAINING_STREAM, split, index)
    pick = np.random.default_rng((*key, 1))
    tumor = index % 3 != 0
    slide = render_slide_with_masks(
        rng=np.random.default_rng((*key, 0)),
        width_px=slide_px,
        height_px=slide_px,
        tumor=tumor,
        tumor_share=float(pick.uniform(0.1, 0.35)),
    )
    # Centres: on tumour (tumour slides), on tissue, or anywhere (background and edges).
    candidates = [np.flatnonzero(slide.tumor), np.flatnonzero(slide.tissue), np.arange(slide.tissue.size)]
    weights = [0.45, 0.4, 0.15] if tumor else [0.0, 0.8, 0.2]
    centres = [pick.choice(candidates[pick.choice(3, p=weights)]) for _ in range(n_tiles)]
    corners = [_corner(int(c), width_px=slide_px) for c in centres]
    crops = [(slice(y, y + TILE_PX), slice(x, x + TILE_PX)) for y, x in corners]
    tissue = np.array([slide.tissue[c].mean() for c in crops], dtype=np.float32)
    tumor_fraction = np.array([slide.tumor[c].mean() for c in crops], dtype=np.float32)
    labels = np.where(tumor_fraction >= MIN_TUMOR_FRACTION, 2, np.where(tissue >= MIN_TISSUE_FRACTION, 1, 0))
    return TileSet(np.stack([slide.image[c] for c in crops]), labels.astype(np.int64), tumor_fraction)


def _corner(centre: int, *, width_px: int) -> tuple[int, int]:
    """Top-left corner of the tile centred on flat pixel index ``centre`` of a square slide, kept inside it."""
    cy, cx = divmod(centre, width_px)
    top = int(np.clip(cy - TILE_PX // 2, 0, width_px - TILE_PX))
    left = int(np.clip(cx - TILE_PX // 2, 0, width_px - TILE_PX))
    return top, left


def augment(pixels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random rotation by 90° steps, flip, and a mild per-channel stain gain/offset, per tile."""
    out = []
    for tile in pixels:  # (3, H, W) in [0, 1]
        tile = torch.rot90(tile, int(rng.integers(4)), dims=(1, 2))
        if rng.random() < 0.5:
            tile = tile.flip(2)
        gain = torch.from_numpy(rng.uniform(0.95, 1.05, (3, 1, 1)).astype(np.float32))
        offset = torch.from_numpy(rng.uniform(-0.02, 0.02, (3, 1, 1)).astype(np.float32))
        out.append((tile * gain + offset).clamp(0.0, 1.0))
    return torch.stack(out)


def unit_pixels(tiles: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [0, 1]."""
    return torch.from_numpy(tiles).permute(0, 3, 1, 2).float().div_(255.0)


# --- training -------------------------------------------------------------------------------------


def train(config: TrainingConfig) -> TrainingResult:
    """Train the backbone (its heads are discarded); deterministic for a seed and thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train(config)
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainingConfig) -> TrainingResult:
    tiles = dict(tiles_per_slide=config.tiles_per_slide, slide_px=config.slide_px, threads=config.threads)
    train_set = render_tiles(seed=config.seed, split=TRAIN_SPLIT, n_slides=config.n_slides, **tiles)
    held_out = render_tiles(seed=config.seed, split=HELD_OUT_SPLIT, n_slides=config.n_held_out_slides, **tiles)
    log.info(
        "%d training tiles (%s), %d held-out",
        len(train_set.labels),
        _class_counts(train_set.labels),
        len(held_out.labels),
    )
    encoder, heads = _fresh_model(config)
    loss = _optimise(encoder, heads, train_set, config)
    accuracy, tumor_accuracy = held_out_accuracy(encoder, heads, held_out)
    log.info("final loss %.4f, held-out accuracy %.3f (tumour vs normal %.3f)", loss, accuracy, tumor_accuracy)
    return TrainingResult(encoder.backbone.eval(), loss, accuracy, tumor_accuracy, len(train_set.labels))


def _fresh_model(config: TrainingConfig) -> tuple[TileEncoder, TrainingHeads]:
    """The registry's architecture, seeded; the heads read the CLS embedding build_encoder returns."""
    spec = get_spec(ENCODER)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        backbone = build_architecture(spec)
        heads = TrainingHeads(embed_dim=spec.embed_dim, projection_dim=config.projection_dim)
    return TileEncoder(spec, backbone, weights_id="training"), heads


def _optimise(encoder: TileEncoder, heads: TrainingHeads, data: TileSet, config: TrainingConfig) -> float:
    """AdamW with linear warm-up and cosine decay; returns the mean loss of the last 20 steps."""
    params = [*encoder.parameters(), *heads.parameters()]
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng((config.seed, ENCODER_TRAINING_STREAM, _AUGMENT_STREAM))
    order = _batch_order(rng, n=len(data.labels), batch_size=config.batch_size, steps=config.steps)
    encoder.train()
    heads.train()
    losses = []
    for step, index in enumerate(order):
        for group in optimiser.param_groups:
            group["lr"] = config.lr * _lr_factor(step, warmup=config.warmup_steps, total=config.steps)
        pixels = unit_pixels(data.pixels[index])
        embedding = encoder(torch.cat([augment(pixels, rng), augment(pixels, rng)]))
        loss = _loss(
            embedding,
            heads,
            labels=torch.from_numpy(data.labels[index]),
            tumor_fraction=torch.from_numpy(data.tumor_fraction[index]),
            config=config,
        )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == config.steps - 1:
            log.info("step %d/%d loss %.4f", step + 1, config.steps, np.mean(losses[-20:]))
    return float(np.mean(losses[-20:]))


def _batch_order(rng: np.random.Generator, *, n: int, batch_size: int, steps: int) -> list[np.ndarray]:
    """Index batches of successive shuffled epochs (sorted within a batch for faster gathers)."""
    epochs = -(-steps * batch_size // n)
    flat = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    return [np.sort(flat[i * batch_size : (i + 1) * batch_size]) for i in range(steps)]


def _lr_factor(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _loss(
    embedding: torch.Tensor,
    heads: TrainingHeads,
    *,
    labels: torch.Tensor,
    tumor_fraction: torch.Tensor,
    config: TrainingConfig,
) -> torch.Tensor:
    """Class cross-entropy + tumour-fraction BCE on both views + the views' contrastive loss."""
    n = len(CLASSES)
    out = heads.classify(embedding)
    labels, tumor_fraction = labels.repeat(2), tumor_fraction.repeat(2)
    supervised = F.cross_entropy(
        out[:, :n], labels
    ) + config.tumor_fraction_weight * F.binary_cross_entropy_with_logits(out[:, n], tumor_fraction)
    return supervised + config.contrastive_weight * _nt_xent(heads.project(embedding), temperature=config.temperature)


def _nt_xent(z: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """SimCLR's loss for (2B, D) projections whose rows i and i + B are views of one tile."""
    z = F.normalize(z, dim=1)
    similarity = (z @ z.T / temperature).fill_diagonal_(float("-inf"))  # a view is not its own positive
    half = len(z) // 2
    positive = torch.cat([torch.arange(half, 2 * half), torch.arange(half)])
    return F.cross_entropy(similarity, positive)


@torch.no_grad()
def held_out_accuracy(
    encoder: TileEncoder, heads: TrainingHeads, data: TileSet, *, batch_size: int = 64
) -> tuple[float, float]:
    """Three-class accuracy, and tumour-vs-normal accuracy on the tissue tiles."""
    encoder.eval()
    heads.eval()
    predicted = np.concatenate(
        [
            heads.classify(encoder(unit_pixels(data.pixels[i : i + batch_size])))[:, : len(CLASSES)].argmax(1).numpy()
            for i in range(0, len(data.labels), batch_size)
        ]
    )
    tissue = data.labels > 0
    return float((predicted == data.labels).mean()), float((predicted[tissue] == data.labels[tissue]).mean())


def _class_counts(labels: np.ndarray) -> str:
    return ", ".join(f"{name} {int((labels == i).sum())}" for i, name in enumerate(CLASSES))


# --- checkpoint -----------------------------------------------------------------------------------


def save_checkpoint(result: TrainingResult, *, config: TrainingConfig, path: Path, command: str) -> None:
    """The backbone's float32 state dict (the training heads are not kept) with the training record as metadata."""
    spec = get_spec(ENCODER)
    metadata = {
        "encoder": ENCODER,
        "architecture": spec.architecture,
        "build_kwargs": json.dumps(dict(spec.build_kwargs), sort_keys=True),
        "training": json.dumps(asdict(config), sort_keys=True),
        "seed": str(config.seed),
        "steps": str(config.steps),
        "n_train_tiles": str(result.n_train_tiles),
        "held_out_accuracy": f"{result.held_out_accuracy:.4f}",
        "held_out_tumor_accuracy": f"{result.held_out_tumor_accuracy:.4f}",
        "final_loss": f"{result.final_loss:.4f}",
        "classes": ",".join(CLASSES),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "command": command,
        # Kernels (hence the last bits, which training amplifies) follow the CPU's vector capability.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    state = {k: v.detach().float().contiguous() for k, v in result.backbone.state_dict().items()}
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    parser.add_argument("--seed", type=int, default=TrainingConfig.seed)
    parser.add_argument("--steps", type=int, default=TrainingConfig.steps)
    parser.add_argument(
        "--threads", type=int, default=TrainingConfig.threads, help="torch threads (results depend on it)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = TrainingConfig(seed=args.seed, steps=args.steps, threads=args.threads)
    started = time.perf_counter()
    result = train(config)
    # The file name only: the same seed gives the same bytes wherever the file is written.
    command = shlex.join(
        [
            "python",
            "-m",
            MODULE,
            "--out",
            args.out.name,
            "--seed",
            str(args.seed),
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
        ]
    )
    save_checkpoint(result, config=config, path=args.out, command=command)
    log.info("wrote %s in %.0f s", args.out, time.perf_counter() - started)


if __name__ == "__main__":
    run_cli(main)
