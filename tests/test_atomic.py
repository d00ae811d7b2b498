"""The one write path (wsiattack.atomic): every writer of an output removes what a killed writer of
the same output left, and leaves nothing behind itself when it fails."""

import numpy as np
import pytest
from wsiattack.atomic import atomic_file
from wsiattack.mil.models import build_mil_model
from wsiattack.mil.training import save_mil_checkpoint
from wsiattack.synthetic import write_demo_cohort, write_pyramidal_tiff


def leave_debris(path):
    """What a SIGKILLed writer of ``path`` leaves: a temporary file and a temporary directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / f".{path.name}.tmp-deadbeef").write_bytes(b"half")
    (path.parent / f".{path.name}.tmp-0badf00d").mkdir()
    neighbour = path.parent / f".other-{path.name}.tmp-12345678"
    neighbour.write_bytes(b"not ours")
    return neighbour


def debris(path):
    return sorted(path.parent.glob(f".{path.name}.tmp-*"))


def test_a_failed_write_leaves_neither_output_nor_temporary(tmp_path):
    target = tmp_path / "out.csv"
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("killed")
    assert not target.exists() and not debris(target)


def test_the_slide_writer_removes_a_killed_writers_debris(tmp_path):
    target = tmp_path / "slides" / "s.tiff"
    neighbour = leave_debris(target)
    write_pyramidal_tiff(target, np.full((512, 512, 3), 200, dtype=np.uint8), mpp=0.5, downsamples=(1, 2))
    assert target.stat().st_size > 0 and not debris(target) and neighbour.exists()


def test_the_mil_checkpoint_writer_removes_a_killed_writers_debris(tmp_path):
    target = tmp_path / "fold0" / "model.safetensors"
    neighbour = leave_debris(target)
    save_mil_checkpoint(target, model=build_mil_model("abmil", in_dim=8, n_classes=2), meta={"fold": 0})
    assert target.stat().st_size > 0 and not debris(target) and neighbour.exists()


def test_the_demo_cohort_writer_removes_a_killed_writers_debris(tmp_path):
    sheet = tmp_path / "demo" / "samples.csv"
    leave_debris(sheet)
    slide = tmp_path / "demo" / "slides" / "demo_000.tiff"
    leave_debris(slide)
    write_demo_cohort(
        slides_dir=slide.parent,
        samples_csv=sheet,
        n_slides=2,
        seed=0,
        classes=["normal", "tumor"],
        width_px=1024,
        height_px=1024,
    )
    assert sheet.exists() and slide.exists() and not debris(sheet) and not debris(slide)
