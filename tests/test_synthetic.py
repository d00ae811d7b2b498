"""Synthetic demo slides: OpenSlide-readable pyramids, determinism, H&E-like look, sample sheet."""

import hashlib
import time
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile
from wsiattack import synthetic

# Small slides keep the tests fast; multiples of 16 so every level has exact dimensions.
SMALL_W, SMALL_H = 1024, 768


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _render(seed: int, *, tumor: bool, width_px: int = SMALL_W, height_px: int = SMALL_H):
    return synthetic.render_slide(rng=np.random.default_rng(seed), width_px=width_px, height_px=height_px, tumor=tumor)


def _dark_purple(image: np.ndarray) -> np.ndarray:
    """Nucleus-like pixels: dark red channel, blue above red."""
    r, b = image[..., 0], image[..., 2]
    return (r < 110) & (b > r)


def _background(image: np.ndarray) -> np.ndarray:
    return (image > 220).all(axis=-1)


@pytest.fixture(scope="module")
def default_pair():
    """One default-size slide rendered without and with tumour from the same seed, plus timing."""
    seconds = []
    images = {}
    for tumor in (False, True):
        start = time.perf_counter()
        images[tumor] = _render(7, tumor=tumor, width_px=5600, height_px=4480)
        seconds.append(time.perf_counter() - start)
    return images, seconds


def test_written_slide_opens_with_openslide(tmp_path):
    image = _render(0, tumor=True)
    path = tmp_path / "slide.tiff"
    synthetic.write_pyramidal_tiff(path, image, mpp=0.5)

    with openslide.OpenSlide(path) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert slide.level_count == 3
        assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
        assert slide.level_dimensions == (
            (SMALL_W, SMALL_H),
            (SMALL_W // 4, SMALL_H // 4),
            (SMALL_W // 16, SMALL_H // 16),
        )
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5, abs=1e-6)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.5, abs=1e-6)
        assert slide.properties["tiff.ResolutionUnit"] == "centimeter"
        # JPEG q90 round trip stays close to the rendered pixels.
        region = np.asarray(slide.read_region((100, 200), 0, (256, 256)).convert("RGB"))
        assert np.abs(region.astype(int) - image[200:456, 100:356]).mean() < 4.0

    # One page per level (not SubIFDs), no JSON description and no timestamp.
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 3
        assert [page.subfiletype for page in tif.pages] == [0, 1, 1]
        assert all(page.is_tiled and page.tilewidth == 256 for page in tif.pages)
        assert all(page.compression == tifffile.COMPRESSION.JPEG for page in tif.pages)
        assert all("DateTime" not in page.tags for page in tif.pages)
        assert all("ImageDescription" not in page.tags for page in tif.pages)


def test_other_mpp_and_downsamples_are_reported(tmp_path):
    image = _render(1, tumor=False, width_px=512, height_px=512)
    path = tmp_path / "slide.tiff"
    synthetic.write_pyramidal_tiff(path, image, mpp=0.25, downsamples=(1, 2, 8), tile_px=128)
    with openslide.OpenSlide(path) as slide:
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 8.0))
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25, abs=1e-6)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.25, abs=1e-6)


def test_failed_write_leaves_no_files(tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tifffile.TiffWriter, "write", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        synthetic.write_pyramidal_tiff(
            tmp_path / "slide.tiff", _render(0, tumor=False, width_px=256, height_px=256), mpp=0.5
        )
    assert list(tmp_path.iterdir()) == []


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    def cohort(name: str, seed: int) -> list[Path]:
        sheet = synthetic.write_demo_cohort(
            slides_dir=tmp_path / name,
            samples_csv=tmp_path / f"{name}.csv",
            n_slides=2,
            seed=seed,
            classes=["normal", "tumor"],
            width_px=512,
            height_px=512,
        )
        return [tmp_path / p for p in sheet["path"]]  # paths are relative to the sheet

    first, again, other = cohort("a", 3), cohort("b", 3), cohort("c", 4)
    assert [_sha256(p) for p in first] == [_sha256(p) for p in again]
    assert _sha256(first[0]) != _sha256(other[0])
    assert _sha256(first[1]) != _sha256(other[1])


def test_default_size_slide_is_fast_and_half_tissue(default_pair):
    images, seconds = default_pair
    # Budget is ~1-2 s per slide on one core; loose bound for slow CI machines.
    assert max(seconds) < 5.0
    for image in images.values():
        assert image.shape == (4480, 5600, 3) and image.dtype == np.uint8
        assert 0.3 < _background(image).mean() < 0.7


def test_tumour_difference_is_local(default_pair):
    images, _ = default_pair
    normal, tumour = images[False], images[True]
    tissue = ~_background(normal)
    dark_normal = _dark_purple(normal).sum() / tissue.sum()
    dark_tumour = _dark_purple(tumour).sum() / tissue.sum()
    assert dark_tumour > dark_normal + 0.02
    assert dark_tumour < 0.15
    # Same seed: tissue, stain and normal nuclei are shared; only the tumour regions differ.
    assert np.array_equal(_background(normal), _background(tumour))
    changed = (normal != tumour).any(axis=-1)
    assert 0.03 < changed.sum() / tissue.sum() < 0.15


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_slides_look_like_tissue_on_glass(seed):
    image = _render(seed, tumor=False)
    background = _background(image)
    assert 0.3 < background.mean() < 0.7
    # Glass is near white with a little noise, tissue is pink (red above green).
    assert np.abs(np.median(image[background], axis=0) - 241).max() <= 3
    assert 0 < image[background].std() < 5
    stroma = image[~background & ~_dark_purple(image)]
    assert (np.median(stroma[:, 0]) - np.median(stroma[:, 1])) > 30


def test_demo_cohort_writes_balanced_sample_sheet(tmp_path):
    slides_dir, csv = tmp_path / "slides", tmp_path / "meta" / "samples.csv"
    sheet = synthetic.write_demo_cohort(
        slides_dir=slides_dir,
        samples_csv=csv,
        n_slides=5,
        seed=0,
        classes=["normal", "tumor"],
        width_px=256,
        height_px=256,
    )
    on_disk = pd.read_csv(csv)
    assert list(on_disk.columns) == ["slide_id", "path", "label"]
    pd.testing.assert_frame_equal(on_disk, sheet)
    assert list(sheet["slide_id"]) == [f"demo_{i:03d}" for i in range(5)]
    # Paths are relative to the sheet's directory (the cohort can be moved as a whole).
    assert list(sheet["path"]) == [f"../slides/demo_{i:03d}.tiff" for i in range(5)]
    assert all(
        (csv.parent / p).resolve() == (slides_dir / f"demo_{i:03d}.tiff").resolve() for i, p in enumerate(sheet["path"])
    )
    assert all((csv.parent / p).is_file() for p in sheet["path"])
    assert sheet["label"].value_counts().to_dict() == {"normal": 2, "tumor": 3}
    # Nothing but the slides themselves in the slide directory (no leftover temporaries).
    assert sorted(p.name for p in slides_dir.iterdir()) == [f"demo_{i:03d}.tiff" for i in range(5)]
    # Labels follow a seeded permutation: same seed, same order.
    again = synthetic.write_demo_cohort(
        slides_dir=tmp_path / "again",
        samples_csv=tmp_path / "again.csv",
        n_slides=5,
        seed=0,
        classes=["normal", "tumor"],
        width_px=256,
        height_px=256,
    )
    assert list(again["label"]) == list(sheet["label"])


@pytest.mark.parametrize("classes", [["only"], ["a", "b", "c"]])
def test_demo_cohort_needs_exactly_two_classes(tmp_path, classes):
    with pytest.raises(ValueError, match="2 classes"):
        synthetic.write_demo_cohort(
            slides_dir=tmp_path, samples_csv=tmp_path / "s.csv", n_slides=4, seed=0, classes=classes
        )


def test_demo_cohort_needs_two_slides(tmp_path):
    with pytest.raises(ValueError, match="n_slides"):
        synthetic.write_demo_cohort(
            slides_dir=tmp_path, samples_csv=tmp_path / "s.csv", n_slides=1, seed=0, classes=["a", "b"]
        )
