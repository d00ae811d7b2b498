"""Benchmark: what a bfloat16 forward pass does to a label-free attack, measured on the CPU.

    cd /work/main && .venv/bin/python tests/benchmarks/bench_attack_precision.py [--encoders demo_trained demo] [--tiles 32]

``precision: encoder`` autocasts an attack's forward passes to the encoder's safe dtype, on CUDA
only; no GPU is at hand here, so this bench emulates it with the CPU's bfloat16 autocast (bf16
operands, float32 accumulation, as on tensor cores). For each encoder, on ``--tiles`` synthetic
224 px tiles (the GPU check's), PGD-L∞ 4/255 with 10 steps is run twice from the same start:
float32, and with every forward pass in bfloat16. It reports

- the clean floor: 1 − cos between the float32 and the bfloat16 embedding of the clean tiles;
- each run's objective after rounding in its own precision (what the attack store records);
- the bfloat16-crafted tiles' objective re-scored in float32: how much of the attack survives
  exact evaluation, as a ratio to the float32 attack's.

The GPU check (tests/gpu/check.py) measures the same on CUDA with the real autocast. Not
collected by pytest (not named test_*).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import time
from pathlib import Path

import torch
from wsiattack import runtime
from wsiattack.attacks.methods import build_method
from wsiattack.attacks.objectives import cosine_distance
from wsiattack.config import check_attack_entry
from wsiattack.encoders.embedding import to_unit_pixels

CHECK = Path(__file__).resolve().parents[1] / "gpu" / "check.py"


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def cpu_bfloat16(device: torch.device, precision: str):
    """Stands in for runtime.autocast on the CPU: bfloat16 whatever the encoder's own dtype."""
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        yield


def embed(encoder, pixels: torch.Tensor, *, bf16: bool) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16):
        return encoder(pixels).float()


def run(encoder, tiles, *, precision: str) -> tuple[torch.Tensor, float, float]:
    """Rounded adversarial pixels, objective in the run's own precision, seconds."""
    entry = check_attack_entry({"method": "pgd", "eps": "4/255", "steps": 10, "precision": precision}, where="bench")
    method, objective = build_method(entry)
    clean = to_unit_pixels(tiles)
    bf16 = precision == "encoder"
    reference = embed(encoder, clean, bf16=bf16)
    started = time.perf_counter()
    outcome = method(
        encoder=encoder,
        clean=clean,
        reference=reference,
        generator=torch.Generator().manual_seed(0),
        objective=objective.fn,
    )
    seconds = time.perf_counter() - started
    levels = torch.as_tensor(tiles).permute(0, 3, 1, 2)
    adversarial = method.ball.quantize(outcome.adversarial, levels).float() / 255
    value = float(objective.fn(embed(encoder, adversarial, bf16=bf16), reference).mean())
    return adversarial, value, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=["demo_trained", "demo"])
    parser.add_argument("--tiles", type=int, default=32)
    args = parser.parse_args()
    check = gpu_check_module()
    tiles = check.synthetic_tiles(args.tiles)
    runtime.autocast = cpu_bfloat16  # what precision: encoder does on CUDA, here on the CPU
    for name in args.encoders:
        encoder = check.random_weights_encoder(name) if name != "demo_trained" else check.build_encoder(name)
        clean = to_unit_pixels(tiles)
        exact = embed(encoder, clean, bf16=False)
        floor = float(cosine_distance(embed(encoder, clean, bf16=True), exact).mean())
        adv32, value32, s32 = run(encoder, tiles, precision="float32")
        adv16, value16, s16 = run(encoder, tiles, precision="encoder")
        rescored = float(cosine_distance(embed(encoder, adv16, bf16=False), exact).mean())
        print(
            f"RESULT {name}: clean floor (1 − cos, bf16 vs fp32) {floor:.3g}; objective float32 {value32:.4g} "
            f"({s32:.1f} s), bfloat16 {value16:.4g} ({s16:.1f} s); bfloat16-crafted tiles scored in float32 "
            f"{rescored:.4g} (× {rescored / value32:.3f} of the float32 attack)",
            flush=True,
        )


if __name__ == "__main__":
    main()
