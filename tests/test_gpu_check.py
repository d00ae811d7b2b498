"""tests/gpu/check.py, the GPU check, in its CPU-sized variant, so that it cannot rot."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))
import check  # noqa: E402


def test_small_variant_passes_on_the_cpu(capsys):
    assert check.main(["--small"]) == 0
    out = capsys.readouterr().out
    assert "CHECK PASSED" in out and "extraction: 48 tiles" in out
    for attack in ("pgd_linf", "pgd_l2", "cw", "noise", "null"):
        assert f"{attack}: 4 tiles" in out


def test_full_variant_without_cuda_says_so_and_checks_nothing(capsys, monkeypatch):
    monkeypatch.setattr(check.runtime, "resolve_device", lambda requested: check.torch.device("cpu"))
    assert check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_bound_check_counts_grey_levels_exactly():
    clean = np.full((2, 4, 4, 3), 100, np.uint8)
    over = clean.copy()
    over[1, 0, 0, 0] += 2  # one value 2 grey levels off
    store = {"index": np.array([1]), "adv_tiles": over[1:]}
    assert check._bound_failures("x", store, {"method": "pgd", "norm": "linf", "eps": 1 / 255}, clean_tiles=clean) == [
        "x: 2 grey levels over the L∞ bound 1"
    ]
    assert check._bound_failures("x", store, {"method": "pgd", "norm": "linf", "eps": 2 / 255}, clean_tiles=clean) == []
    # L2: radius eps·sqrt(48) in [0,1] units; 2 grey levels² = 4 > floor((0.25/255·sqrt(48)·255)²) = 3
    assert check._bound_failures("x", store, {"method": "cw", "eps": 0.25 / 255}, clean_tiles=clean) == [
        "x: 4 squared grey levels over the L2 budget 3"
    ]
