"""Tiling on generated slides (layouts from test_slides.py): counts, level-0 coordinates,
physical size, the empty-slide policy, bad inputs, determinism under threads."""

import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_slides import GLASS, PINK, corrupt_level0, slide_image, write_svs, write_tiff
from wsiattack import stores, tiling
from wsiattack.errors import SlideError
from wsiattack.tilereader import TileReader

SPEC = {
    "tile_px": 224,
    "target_mpp": 0.5,
    "mpp_tolerance": 0.05,
    "allow_objective_power": False,
    "skip_empty": False,
    "store_pixels": False,
    "tissue": {
        "method": "otsu",
        "min_fraction": 0.5,
        "thumbnail_mpp": 8.0,
        "min_object_um2": 20000.0,
        "max_hole_um2": 20000.0,
    },
}
PIXELS_SPEC = {**SPEC, "store_pixels": True}


def run(tmp_path: Path, slide: Path, *, spec=SPEC, **kwargs) -> tuple[int, Path]:
    out = tmp_path / "tiles.zarr"
    n = tiling.tile_slide(
        slide_id="s1", slide_path=slide, spec=spec, out_store=out, out_qc=tmp_path / "qc.png", **kwargs
    )
    return n, out


def load(out: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Tiles (as every stage gets them, through TileReader), coords and attrs of a tiles store."""
    with TileReader(out) as reader:
        tiles = reader[:]
    group = stores.open_store(out, kind=stores.TILES)
    return tiles, np.asarray(group["coords"][...]), dict(group.attrs)


def assert_the_pink_rectangle(tiles: np.ndarray, coords: np.ndarray, *, mpp: float) -> None:
    """16 tiles covering x in [224, 672) µm and y in [112, 560) µm, pink up to their edges."""
    side0 = 224 * 0.5 / mpp  # tile side in level-0 pixels: 112 µm whatever the scanner
    assert tiles.shape == (16, 224, 224, 3) and tiles.dtype == np.uint8
    np.testing.assert_array_equal(np.unique(coords[:, 0]), np.round(np.arange(2, 6) * side0))
    np.testing.assert_array_equal(np.unique(coords[:, 1]), np.round(np.arange(1, 5) * side0))
    assert np.abs(tiles.reshape(-1, 3).mean(0) - PINK).max() < 6
    # No glass inside any tile, not even a resampled pixel at an edge (green: pink 140, glass 240).
    edges = np.concatenate([tiles[:, [0, -1], :, 1].reshape(16, -1), tiles[:, :, [0, -1], 1].reshape(16, -1)], axis=1)
    assert edges.mean(axis=1).max() < 160


def no_outputs_left(tmp_path: Path) -> bool:
    return not [p for p in tmp_path.iterdir() if p.name.startswith(("tiles.zarr", ".tiles.zarr", "qc.png", ".qc.png"))]


# --------------------------------------------------------------------------------------------
# Layouts and resolutions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mpp", [0.5, 0.25, 0.3])
def test_every_scanner_resolution_gives_the_same_physical_tiles(tmp_path, mpp):
    n, out = run(tmp_path, write_tiff(tmp_path / "g.tiff", slide_image(mpp), mpp=mpp))
    tiles, coords, attrs = load(out)
    assert n == 16
    assert_the_pink_rectangle(tiles, coords, mpp=mpp)
    assert attrs["source_mpp"] == pytest.approx(mpp) and attrs["level"] == 0 and attrs["tile_px"] == 224
    assert attrs["vendor"] == "generic-tiff" and attrs["mpp_source"] == "openslide.mpp-x/y"
    assert attrs["source"]["size_bytes"] > 0 and len(attrs["source"]["sha256_head_tail"]) == 64
    assert "skipped" not in attrs
    assert Image.open(tmp_path / "qc.png").size == (112, 84)


def test_reads_the_coarsest_level_not_coarser_than_the_target(tmp_path):
    """A 0.125 µm/px slide with levels at 0.125/0.5/2.0 is tiled from level 1 without resizing."""
    n, out = run(tmp_path, write_tiff(tmp_path / "fine.tiff", slide_image(0.125), mpp=0.125))
    tiles, coords, attrs = load(out)
    assert n == 16 and attrs["level"] == 1 and attrs["level_downsample"] == pytest.approx(4.0)
    assert_the_pink_rectangle(tiles, coords, mpp=0.125)


def test_svs_at_40x_is_resized_by_a_non_integer_factor(tmp_path):
    """Aperio 40x at 0.2635 µm/px (levels 1, 4): level 0 is read, 425.0 px -> 224 px per tile."""
    n, out = run(tmp_path, write_svs(tmp_path / "a.svs", slide_image(0.2635), mpp=0.2635))
    tiles, coords, attrs = load(out)
    assert n == 16 and attrs["vendor"] == "aperio" and attrs["level"] == 0
    assert attrs["source_mpp"] == pytest.approx(0.2635)
    assert_the_pink_rectangle(tiles, coords, mpp=0.2635)


def test_a_level_with_a_non_integer_downsample_is_read_and_resized(tmp_path):
    """0.25 µm/px with a level at 1.5x (0.375 µm/px): that level is read, 298.7 px -> 224 px."""
    n, out = run(tmp_path, write_tiff(tmp_path / "g.tiff", slide_image(0.25), mpp=0.25, downsamples=(1, 1.5, 6)))
    tiles, coords, attrs = load(out)
    assert n == 16 and attrs["level"] == 1 and attrs["level_downsample"] == pytest.approx(1.5, rel=1e-3)
    assert_the_pink_rectangle(tiles, coords, mpp=0.25)


def test_a_single_level_slide(tmp_path):
    n, out = run(tmp_path, write_tiff(tmp_path / "flat.tiff", slide_image(0.5), mpp=0.5, downsamples=(1,)))
    tiles, coords, attrs = load(out)
    assert n == 16 and attrs["level"] == 0 and attrs["level_downsample"] == 1.0
    assert_the_pink_rectangle(tiles, coords, mpp=0.5)


def test_missing_resolution_needs_an_mpp_override(tmp_path):
    path = write_tiff(tmp_path / "nompp.tiff", slide_image(0.5), mpp=None)
    with pytest.raises(
        SlideError, match=r"^slide 's1': .*nompp\.tiff has no resolution metadata .* add an 'mpp' column"
    ):
        run(tmp_path, path)
    assert no_outputs_left(tmp_path)
    n, out = run(tmp_path, path, mpp_override=0.5)
    assert n == 16 and load(out)[2]["mpp_source"] == "sample sheet"


def test_objective_power_only_is_used_only_when_allowed(tmp_path, caplog):
    path = write_svs(tmp_path / "mag.svs", slide_image(0.5), mpp=None, app_mag=20)
    with pytest.raises(
        SlideError, match=r"^slide 's1': .* only an objective power \(20x\); .* tiling.allow_objective_power: true"
    ):
        run(tmp_path, path)
    assert no_outputs_left(tmp_path)
    with caplog.at_level(logging.WARNING):
        n, out = run(tmp_path, path, spec={**SPEC, "allow_objective_power": True})
    tiles, coords, attrs = load(out)
    assert n == 16 and attrs["mpp_source"] == "openslide.objective-power" and attrs["source_mpp"] == 0.5
    assert_the_pink_rectangle(tiles, coords, mpp=0.5)
    assert "objective power 20x" in caplog.text


# --------------------------------------------------------------------------------------------
# Tissue, empty slides, QC
# --------------------------------------------------------------------------------------------


def test_no_tissue_is_an_error_naming_the_slide_and_leaves_nothing(tmp_path):
    with pytest.raises(SlideError) as error:
        run(tmp_path, write_tiff(tmp_path / "blank.tiff", slide_image(0.5, tissue=False), mpp=0.5))
    assert str(error.value) == (
        f"slide 's1': no tissue found in {tmp_path / 'blank.tiff'} (no 224 px tile at 0.5 µm/px has >= 50% tissue); "
        "check the slide, remove it from the sample sheet, or set tiling.skip_empty: true"
    )
    assert no_outputs_left(tmp_path)


def test_skip_empty_writes_an_empty_store_and_a_qc_png(tmp_path, caplog):
    path = write_tiff(tmp_path / "blank.tiff", slide_image(0.5, tissue=False), mpp=0.5)
    with caplog.at_level(logging.WARNING):
        n, out = run(tmp_path, path, spec={**SPEC, "skip_empty": True})
    tiles, coords, attrs = load(out)
    assert n == 0 and tiles.shape == (0, 224, 224, 3) and coords.shape == (0, 2)
    assert attrs["skipped"] == "no tissue" and attrs["level"] == 0 and attrs["tiling"]["skip_empty"] is True
    assert Image.open(tmp_path / "qc.png").size == (112, 84)
    assert "no tissue found" in caplog.text and "tiling.skip_empty" in caplog.text


def test_a_large_hole_stays_background_and_a_small_one_is_filled(tmp_path):
    """An 8 x 8-tile section (0.5 µm/px, 224 px tiles) with a 2 x 2-tile lumen (50 000 µm² >
    max_hole_um2) and, inside one tile, a 110 x 110 µm hole (12 100 µm² < max_hole_um2)."""
    image = np.full((2240, 2240, 3), GLASS, dtype=np.uint8)
    image[224:2016, 224:2016] = PINK  # tiles (row, col) 1..8
    image[896:1344, 896:1344] = GLASS  # lumen: tiles (4..5, 4..5)
    image[1570:1790, 450:670] = GLASS  # small hole: 96% of tile (7, 2)
    n, out = run(tmp_path, write_tiff(tmp_path / "ring.tiff", image, mpp=0.5))
    cells = {(y // 224, x // 224) for x, y in load(out)[1]}
    assert n == 60 and not cells & {(4, 4), (4, 5), (5, 4), (5, 5)} and (7, 2) in cells


def test_qc_png_shows_the_mask_and_the_kept_tiles(tmp_path):
    run(tmp_path, write_tiff(tmp_path / "g.tiff", slide_image(0.5), mpp=0.5))
    qc = np.asarray(Image.open(tmp_path / "qc.png").convert("RGB")).astype(int)
    # Thumbnail px = 8 µm: the rectangle spans x 28-84, y 14-70; tile outlines every 14 px.
    assert qc[40, 40, 1] > qc[40, 40, 0]  # tinted green inside the tissue
    assert tuple(qc[14, 40]) == (0, 60, 255) and tuple(qc[40, 42]) == (0, 60, 255)  # tile edges
    assert np.abs(qc[5, 5] - GLASS).max() <= 3  # glass untouched


# --------------------------------------------------------------------------------------------
# Reading: blocks, threads, order
# --------------------------------------------------------------------------------------------


def test_tiles_are_exactly_the_slide_at_their_coords_whatever_the_blocks_and_threads(tmp_path, monkeypatch):
    """Blocks of 2 x 2 tiles (and 9 x 9) on 1 and 2 threads: same tiles, each equal to a direct read."""
    import openslide

    path = write_tiff(tmp_path / "g.tiff", slide_image(0.5, seed=3), mpp=0.5)
    results = []
    for block_px, threads in ((500, 1), (500, 2), (2048, 2)):
        monkeypatch.setattr(tiling, "BLOCK_LEVEL_PX", block_px)
        run(tmp_path, path, threads=threads)
        tiles, coords, _ = load(tmp_path / "tiles.zarr")
        results.append({tuple(c): t for c, t in zip(coords.tolist(), tiles, strict=True)})
    assert results[0].keys() == results[1].keys() == results[2].keys() and len(results[0]) == 16
    with openslide.OpenSlide(path) as handle:
        for x, y in results[0]:
            direct = np.asarray(handle.read_region((x, y), 0, (224, 224)).convert("RGB"))
            for result in results:
                np.testing.assert_array_equal(result[(x, y)], direct)


def test_resized_tiles_match_a_per_tile_resize_from_their_exact_origin(tmp_path):
    """40x SVS (425.05 level px per tile): each tile of the block-wise resize equals, to within
    rounding, a tile resized on its own from its exact, fractional level-0 origin (a half-pixel
    misplacement gives a mean difference of 0.2-0.5 grey levels on this noise)."""
    import openslide

    path = write_svs(tmp_path / "a.svs", slide_image(0.2635, seed=5), mpp=0.2635)
    _, out = run(tmp_path, path)
    tiles, coords, _ = load(out)
    side0 = 112 / 0.2635
    with openslide.OpenSlide(path) as handle:
        for (x, y), tile in zip(coords.tolist(), tiles, strict=True):
            exact_x, exact_y = round(x / side0) * side0, round(y / side0) * side0
            left, top = math.floor(exact_x) - 2, math.floor(exact_y) - 2
            region = handle.read_region((left, top), 0, (math.ceil(side0) + 5,) * 2).convert("RGB")
            box = (exact_x - left, exact_y - top, exact_x - left + side0, exact_y - top + side0)
            expected = np.asarray(region.resize((224, 224), Image.Resampling.BILINEAR, box=box, reducing_gap=None))
            assert np.abs(expected.astype(int) - tile.astype(int)).mean() < 0.12


def test_threads_give_a_byte_identical_store(tmp_path, monkeypatch):
    """Same slide and spec, 1 or 2 threads, one or several chunks per write: the same bytes in
    every file of the store (and the same QC image)."""
    path = write_svs(tmp_path / "a.svs", slide_image(0.2635), mpp=0.2635)
    stores_, files = [], []
    for threads, chunks_per_write in ((1, 1), (2, tiling.WRITE_CHUNKS)):
        monkeypatch.setattr(tiling, "WRITE_CHUNKS", chunks_per_write)
        monkeypatch.setattr(stores, "TILES_PER_CHUNK", 3)  # 16 tiles: 6 chunks, the last one partial
        (tmp_path / str(threads)).mkdir()
        _, out = run(tmp_path / str(threads), path, spec=PIXELS_SPEC, threads=threads)
        stores_.append(load(out))
        files.append(
            {f.relative_to(out.parent).as_posix(): f.read_bytes() for f in out.parent.rglob("*") if f.is_file()}
        )
    np.testing.assert_array_equal(stores_[0][0], stores_[1][0])
    np.testing.assert_array_equal(stores_[0][1], stores_[1][1])
    assert stores_[0][2] == stores_[1][2]
    assert len([name for name in files[0] if "/tiles/c/" in name]) == 6
    assert files[0].keys() == files[1].keys() and all(files[0][name] == files[1][name] for name in files[0])


class RecordingArray:
    """Stands in for a zarr array: records each write (a copy), optionally fails on one."""

    def __init__(self, n: int, *, chunk: int, fail_on: int | None = None) -> None:
        self.shape, self.chunks, self.fail_on, self.writes = (n, 2, 2, 3), (chunk, 2, 2, 3), fail_on, []

    def __setitem__(self, index: slice, value: np.ndarray) -> None:
        if len(self.writes) == self.fail_on:
            raise OSError("disk full")
        self.writes.append((index.start, index.stop, value.copy()))


def test_write_in_chunks_stores_whole_chunks_in_order_and_propagates_writer_errors():
    tiles = np.arange(23 * 12, dtype=np.uint8).reshape(23, 2, 2, 3)
    batches = [tiles[:5], tiles[5:6], tiles[6:20], tiles[20:]]  # batch edges unrelated to chunks
    array = RecordingArray(23, chunk=3)
    tiling.write_in_chunks(array, batches=iter(batches), chunks_per_write=2, depth=2)
    assert [(a, b) for a, b, _ in array.writes] == [
        (0, 6),
        (6, 12),
        (12, 18),
        (18, 23),
    ]  # 2 chunks a write, last one short
    np.testing.assert_array_equal(np.concatenate([v for _, _, v in array.writes]), tiles)
    with pytest.raises(OSError, match="disk full"):
        tiling.write_in_chunks(
            RecordingArray(23, chunk=3, fail_on=1), batches=iter(batches), chunks_per_write=1, depth=1
        )
    with pytest.raises(RuntimeError, match="wrote 20 tiles into an array of 23"):
        tiling.write_in_chunks(RecordingArray(23, chunk=3), batches=iter(batches[:3]))


def test_plan_blocks_groups_cells_into_bounded_blocks_in_a_fixed_order():
    """5 x 7 cells minus the first column of the top band, in blocks of at most 3 x 3."""
    cells = np.array([(r, c) for r in range(5) for c in range(7) if not (c == 0 and r < 3)])
    blocks = tiling.plan_blocks(cells, block_cells=3)
    # Bands top to bottom, blocks left to right, each cropped to its cells' bounding box.
    assert [(b.row0, b.col0, b.rows, b.cols) for b in blocks] == [
        (0, 1, 3, 2),
        (0, 3, 3, 3),
        (0, 6, 3, 1),
        (3, 0, 2, 3),
        (3, 3, 2, 3),
        (3, 6, 2, 1),
    ]
    assert blocks[0].cells.tolist() == [[0, 1], [0, 2], [1, 1], [1, 2], [2, 1], [2, 2]]  # row-major inside
    assert sorted(map(tuple, np.concatenate([b.cells for b in blocks]).tolist())) == sorted(map(tuple, cells.tolist()))


# --------------------------------------------------------------------------------------------
# Bad inputs and the store contract
# --------------------------------------------------------------------------------------------


def test_text_file_named_svs_is_rejected(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("this is not a slide\n")
    with pytest.raises(SlideError, match=r"^slide 's1': .*notes\.svs is not a slide format OpenSlide can read"):
        run(tmp_path, path)
    assert no_outputs_left(tmp_path)


def test_truncated_slide_is_rejected_without_a_store(tmp_path):
    path = write_tiff(tmp_path / "cut.tiff", slide_image(0.5), mpp=0.5)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(
        SlideError,
        match=r"^slide 's1': .*cut\.tiff is a TIFF file that OpenSlide cannot open: it is truncated or corrupt",
    ):
        run(tmp_path, path)
    assert no_outputs_left(tmp_path)


@pytest.mark.parametrize("threads", [1, 2])
def test_undecodable_tiles_stop_the_job_without_a_store(tmp_path, threads, monkeypatch):
    monkeypatch.setattr(tiling, "BLOCK_LEVEL_PX", 500)  # many blocks: the error arrives mid-way
    path = corrupt_level0(write_tiff(tmp_path / "bad.tiff", slide_image(0.5), mpp=0.5, downsamples=(1, 16)))
    with pytest.raises(SlideError, match=r"^slide 's1': .*bad\.tiff could not be decoded"):
        run(tmp_path, path, spec=PIXELS_SPEC, threads=threads)
    assert no_outputs_left(tmp_path)


def test_undecodable_tiles_of_a_coordinate_store_fail_the_reader_naming_the_slide(tmp_path):
    """Without pixels in the store, the damage shows when a stage reads the tiles: one clear error."""
    path = corrupt_level0(write_tiff(tmp_path / "bad.tiff", slide_image(0.5), mpp=0.5, downsamples=(1, 16)))
    _, out = run(tmp_path, path)
    with (
        TileReader(out, threads=2) as reader,
        pytest.raises(SlideError, match=r"^slide 's1': .*bad\.tiff could not be decoded"),
    ):
        list(reader.iter_batches(batch_size=4))


# --------------------------------------------------------------------------------------------
# The shared reader: every stage gets the same bytes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["tiff", "svs"])  # native level, and resized by 425.05 / 224
def test_coordinate_store_reads_the_same_bytes_as_a_pixel_store_in_any_order_or_subset(tmp_path, layout, monkeypatch):
    monkeypatch.setattr(tiling, "BLOCK_LEVEL_PX", 700)  # several blocks, so subsets cut blocks differently
    if layout == "svs":
        path = write_svs(tmp_path / "a.svs", slide_image(0.2635, seed=5), mpp=0.2635)
    else:
        path = write_tiff(tmp_path / "a.tiff", slide_image(0.5, seed=5), mpp=0.5)
    (tmp_path / "c").mkdir(), (tmp_path / "p").mkdir()
    _, coords_only = run(tmp_path / "c", path)
    _, with_pixels = run(tmp_path / "p", path, spec=PIXELS_SPEC)
    assert "tiles" not in stores.open_store(coords_only, kind=stores.TILES)
    stored = np.asarray(stores.open_store(with_pixels, kind=stores.TILES)["tiles"][...])
    with TileReader(coords_only) as reader:
        np.testing.assert_array_equal(reader[:], stored)
        np.testing.assert_array_equal(np.concatenate([b for _, b in reader.iter_batches(batch_size=5)]), stored)
        for seed in range(3):  # single tiles and scattered subsets, repeats included, any order
            index = np.random.default_rng(seed).integers(0, len(stored), size=1 + 4 * seed)
            np.testing.assert_array_equal(reader.read(index), stored[index])
    with TileReader(with_pixels) as reader:
        np.testing.assert_array_equal(reader.read(np.array([3, 0])), stored[[3, 0]])


def test_reader_refuses_a_slide_that_changed_since_tiling(tmp_path):
    path = write_tiff(tmp_path / "a.tiff", slide_image(0.5), mpp=0.5)
    _, out = run(tmp_path, path)
    other = write_tiff(tmp_path / "b.tiff", slide_image(0.5, seed=9), mpp=0.5)
    with (
        TileReader(out, slide_path=other) as reader,
        pytest.raises(stores.StoreError, match=r"b\.tiff is not the slide that was tiled"),
    ):
        reader.read(np.array([0]))
    path.unlink()
    with TileReader(out) as reader, pytest.raises(stores.StoreError, match=r"its slide .*a\.tiff is missing"):
        reader.read(np.array([0]))


def test_a_slide_smaller_than_one_tile_is_an_error(tmp_path):
    path = write_tiff(tmp_path / "tiny.tiff", np.full((100, 100, 3), 200, np.uint8), mpp=None, downsamples=(1,))
    with pytest.raises(
        SlideError,
        match=r"^slide 's1': at 0.5 µm/px \(from sample sheet\) the slide \(100 x 100 px\) is smaller than one 112 µm tile",
    ):
        run(tmp_path, path, mpp_override=0.5)


def test_stores_refuse_a_mismatched_spec(tmp_path):
    _, out = run(tmp_path, write_tiff(tmp_path / "g.tiff", slide_image(0.5), mpp=0.5))
    group = stores.open_store(out, kind=stores.TILES)
    stores.require_attrs(group, path=out, expected=tiling.expected_tiles_attrs(SPEC))
    changed = {**SPEC, "tissue": {**SPEC["tissue"], "min_fraction": 0.25}}
    with pytest.raises(
        stores.StoreError, match=r"attribute 'tiling' is .* but the current spec needs .*'min_fraction': 0.25"
    ):
        stores.require_attrs(group, path=out, expected=tiling.expected_tiles_attrs(changed))
    with pytest.raises(stores.StoreError, match=r"attribute 'tile_px' is 224 but the current spec needs 256"):
        stores.require_attrs(group, path=out, expected={"tile_px": 256})


def test_expected_tiles_attrs_is_importable_without_openslide_scipy_or_pillow():
    """Rules in the encoder/MIL environments check tiles stores with it but have no slide reader."""
    import subprocess
    import sys

    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'openslide', 'scipy', 'PIL'}:\n"
        "            raise ImportError(f'no {name} here')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.path.insert(0, {str(Path(tiling.__file__).parents[1])!r})\n"
        "from wsiattack import tiling\n"
        "print(tiling.expected_tiles_attrs({'tile_px': 224, 'target_mpp': 0.5})['tile_px'])\n"
        "try:\n"
        "    tiling.tile_slide(slide_id='s1', slide_path='x', spec={}, out_store='x', out_qc='y')\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == ["224", "tiling needs the slides environment (envs/slides.yaml): no PIL here"]
