"""Tiling on generated slides: counts, level-0 coordinates, physical size, and bad inputs."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from wsiattack import stores, tiling
from wsiattack.errors import SlideError
from wsiattack.synthetic import write_pyramidal_tiff

SPEC = {"tile_px": 224, "target_mpp": 0.5, "mpp_tolerance": 0.05, "tissue": {"method": "otsu", "min_fraction": 0.5, "thumbnail_mpp": 8.0, "min_object_um2": 20000.0}}
# A pink rectangle, aligned with the 224 px grid at 0.5 µm/px: 4 x 4 tiles, physically
# x in [224, 672) µm and y in [112, 560) µm, on a 896 x 672 µm glass slide.
RECT_UM = (224.0, 112.0, 672.0, 560.0)
SLIDE_UM = (896.0, 672.0)


def slide_image(mpp: float, *, tissue: bool = True) -> np.ndarray:
    width, height = (round(s / mpp) for s in SLIDE_UM)
    rng = np.random.default_rng(0)
    image = np.full((height, width, 3), 240, dtype=np.uint8)
    if tissue:
        x0, y0, x1, y1 = (round(v / mpp) for v in RECT_UM)
        image[y0:y1, x0:x1] = np.clip(np.array([220, 140, 180]) + rng.normal(0, 8, (y1 - y0, x1 - x0, 3)), 0, 255)
    return image


def make_slide(tmp_path: Path, mpp: float, **kwargs) -> Path:
    path = tmp_path / f"slide_{mpp}.tiff"
    write_pyramidal_tiff(path, slide_image(mpp, **kwargs), mpp=mpp, downsamples=(1, 4, 16))
    return path


def run(tmp_path: Path, slide: Path, **kwargs) -> tuple[int, Path]:
    out = tmp_path / "tiles.zarr"
    n = tiling.tile_slide(slide_id="s1", slide_path=slide, spec=SPEC, out_store=out, out_qc=tmp_path / "qc.png", **kwargs)
    return n, out


@pytest.mark.parametrize("mpp", [0.5, 0.25, 0.3])
def test_every_scanner_resolution_gives_the_same_physical_tiles(tmp_path, mpp):
    n, out = run(tmp_path, make_slide(tmp_path, mpp))
    group = stores.open_store(out, kind=stores.TILES)
    assert n == 16
    assert group["tiles"].shape == (16, 224, 224, 3) and group["tiles"].dtype == np.uint8
    coords = np.asarray(group["coords"][...])
    side0 = 224 * 0.5 / mpp  # tile side in level-0 pixels
    np.testing.assert_array_equal(np.unique(coords[:, 0]), np.round(np.arange(2, 6) * side0))  # 224-672 µm
    np.testing.assert_array_equal(np.unique(coords[:, 1]), np.round(np.arange(1, 5) * side0))  # 112-560 µm
    tiles = np.asarray(group["tiles"][...])
    assert np.abs(tiles.reshape(-1, 3).mean(0) - [220, 140, 180]).max() < 6  # all pink: no glass inside
    attrs = dict(group.attrs)
    assert attrs["source_mpp"] == pytest.approx(mpp) and attrs["level"] == 0 and attrs["tile_px"] == 224
    assert attrs["source"]["size_bytes"] > 0 and len(attrs["source"]["sha256_head_tail"]) == 64
    assert Image.open(tmp_path / "qc.png").size == (112, 84)


def test_reads_the_coarsest_level_not_coarser_than_the_target(tmp_path):
    """A 0.125 µm/px slide with levels at 0.125/0.5/2.0 is tiled from level 1 without resizing."""
    path = tmp_path / "fine.tiff"
    write_pyramidal_tiff(path, slide_image(0.125), mpp=0.125, downsamples=(1, 4, 16))
    n, out = run(tmp_path, path)
    attrs = dict(stores.open_store(out, kind=stores.TILES).attrs)
    assert n == 16 and attrs["level"] == 1 and attrs["level_downsample"] == pytest.approx(4.0)


def test_no_tissue_is_an_error_naming_the_slide_and_leaves_no_store(tmp_path):
    with pytest.raises(SlideError, match=r"slide 's1': no tissue found"):
        run(tmp_path, make_slide(tmp_path, 0.5, tissue=False))
    assert not (tmp_path / "tiles.zarr").exists() and not list(tmp_path.glob(".tiles.zarr*"))


def test_missing_resolution_needs_an_mpp_override(tmp_path):
    path = tmp_path / "nompp.tiff"
    image = slide_image(0.5)
    with tifffile.TiffWriter(path) as tif:  # no resolution tags at all
        tif.write(image, tile=(256, 256), photometric="rgb", metadata=None, resolutionunit=1)
    with pytest.raises(SlideError, match=r"slide 's1': .* no resolution metadata .* add an 'mpp' column"):
        run(tmp_path, path)
    n, _ = run(tmp_path, path, mpp_override=0.5)
    assert n == 16


def test_text_file_named_svs_is_rejected(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("this is not a slide\n")
    with pytest.raises(SlideError, match=r"slide 's1': .*notes\.svs is not a slide format OpenSlide can read"):
        run(tmp_path, path)


def test_truncated_slide_is_rejected_without_a_store(tmp_path):
    path = make_slide(tmp_path, 0.5)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match=r"slide 's1'"):
        run(tmp_path, path)
    assert not (tmp_path / "tiles.zarr").exists()


def test_stores_refuse_a_mismatched_spec(tmp_path):
    _, out = run(tmp_path, make_slide(tmp_path, 0.5))
    group = stores.open_store(out, kind=stores.TILES)
    stores.require_attrs(group, path=out, expected={"tile_px": 224, "tiling": SPEC})
    with pytest.raises(stores.StoreError, match=r"attribute 'tile_px' is 224 but the current spec needs 256"):
        stores.require_attrs(group, path=out, expected={"tile_px": 256})
    with pytest.raises(stores.StoreError, match=r"expected a 'features' store, found 'tiles'"):
        stores.open_store(out, kind=stores.FEATURES)
