"""The slide reader on generated slides: layouts OpenSlide recognises, resolution sources, bad files.

The writers here are shared with test_tiling.py. Every slide shows the same scene: a pink,
slightly noisy rectangle on glass, aligned with the 224 px grid at 0.5 µm/px (4 x 4 tiles at
x in [224, 672) µm, y in [112, 560) µm on an 896 x 672 µm slide), whatever its pixel size.
"""

import logging
import math
import threading
import time
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import zarr
from PIL import Image
from wsiattack import slides
from wsiattack.errors import SlideError

RECT_UM = (224.0, 112.0, 672.0, 560.0)
SLIDE_UM = (896.0, 672.0)
PINK = (220, 140, 180)
GLASS = 240


def slide_image(mpp: float, *, tissue: bool = True, seed: int = 0) -> np.ndarray:
    width, height = (round(s / mpp) for s in SLIDE_UM)
    image = np.full((height, width, 3), GLASS, dtype=np.uint8)
    if tissue:
        x0, y0, x1, y1 = (round(v / mpp) for v in RECT_UM)
        noise = np.random.default_rng(seed).normal(0, 8, (y1 - y0, x1 - x0, 3))
        image[y0:y1, x0:x1] = np.clip(np.array(PINK) + noise, 0, 255)
    return image


def reduce(image: np.ndarray, downsample: float) -> np.ndarray:
    """Box-filtered level for any (also non-integer) downsample."""
    height, width = image.shape[:2]
    size = (max(1, round(width / downsample)), max(1, round(height / downsample)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def write_tiff(
    path: Path, image: np.ndarray, *, mpp: float | None, downsamples=(1, 4, 16), unit: str = "CENTIMETER"
) -> Path:
    """Generic pyramidal TIFF (OpenSlide ``generic-tiff``): one tiled JPEG page per level.

    ``mpp=None`` writes no resolution (tifffile's default is 1 px per unit "none").
    """
    per_unit = {"CENTIMETER": 1e4, "INCH": 25400.0}[unit]
    with tifffile.TiffWriter(path) as tif:
        for i, downsample in enumerate(downsamples):
            resolution = (
                {} if mpp is None else {"resolution": (per_unit / (mpp * downsample),) * 2, "resolutionunit": unit}
            )
            tif.write(
                reduce(image, downsample),
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 95},
                subfiletype=0 if i == 0 else 1,
                metadata=None,
                **resolution,
            )
    return path


def aperio_description(image: np.ndarray, *, mpp: float | None, app_mag: int | None) -> str:
    height, width = image.shape[:2]
    fields = [f"{width}x{height} [0,0 {width}x{height}] (256x256) JPEG/RGB Q=95"]
    fields += [f"AppMag = {app_mag}"] if app_mag is not None else []
    fields += [f"MPP = {mpp}"] if mpp is not None else []
    return "Aperio Image Library v12.0.15 \r\n" + "|".join(fields)


def write_svs(
    path: Path,
    image: np.ndarray,
    *,
    mpp: float | None,
    app_mag: int | None = 40,
    downsamples=(1, 4),
    resolution_mpp: float | None = None,
) -> Path:
    """Aperio SVS layout: tiled level 0 whose ImageDescription starts with "Aperio", a stripped
    thumbnail page, the reduced levels as further tiled pages, a stripped label page.

    OpenSlide's aperio reader takes every tiled page as a level, the stripped page after level 0
    as the thumbnail, and a later stripped page as an associated image named by the second line of
    its description (only with NewSubfileType 1: OpenSlide 4.0.1 skips it otherwise). tifffile must
    write no JSON description of its own (``metadata=None``), or the vendor is not recognised.
    ``resolution_mpp`` adds TIFF resolution tags, which the aperio reader ignores.
    """
    description = aperio_description(image, mpp=mpp, app_mag=app_mag)
    tags = {} if resolution_mpp is None else {"resolution": (1e4 / resolution_mpp,) * 2, "resolutionunit": "CENTIMETER"}
    jpeg = {"photometric": "rgb", "compression": "jpeg", "compressionargs": {"level": 95}, "metadata": None}
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(256, 256), description=description, **jpeg, **tags)
        tif.write(reduce(image, 8), rowsperstrip=16, description=description.replace("\r\n", "\r\nthumbnail "), **jpeg)
        for downsample in downsamples[1:]:
            tif.write(reduce(image, downsample), tile=(256, 256), description=description, **jpeg)
        tif.write(
            np.full((64, 128, 3), 200, np.uint8),
            rowsperstrip=16,
            subfiletype=1,
            description="Aperio Image Library v12.0.15\r\nlabel 128x64",
            **jpeg,
        )
    return path


DICOM_WSI_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def write_dicom(folder: Path, image: np.ndarray, *, mpp: float, downsamples=(1, 4), tile_px: int = 256) -> Path:
    """DICOM WSI (OpenSlide ``dicom``): one file per level in ``folder``, all of one series.

    Each level is a TILED_FULL multi-frame VL Whole Slide Microscopy image, frames row-major and
    uncompressed RGB (Explicit VR Little Endian, which OpenSlide 4 decodes like JPEG ones), edge
    frames padded with white; the pixel spacing (mm) sits in the shared functional groups, where
    OpenSlide reads ``openslide.mpp-x/y``. Returns level 0's file: OpenSlide opens any file of the
    series and finds the others in the folder.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uid = lambda name: generate_uid(entropy_srcs=[str(folder), name])  # noqa: E731 - deterministic per folder
    paths = []
    for i, downsample in enumerate(downsamples):
        level = reduce(image, downsample)
        height, width = level.shape[:2]
        across, down = -(-width // tile_px), -(-height // tile_px)
        padded = np.full((down * tile_px, across * tile_px, 3), 255, np.uint8)
        padded[:height, :width] = level
        frames = padded.reshape(down, tile_px, across, tile_px, 3).swapaxes(1, 2)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = DICOM_WSI_CLASS
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = uid(f"level {i}")
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
            uid("study"),
            uid("series"),
            uid("frame of reference"),
        )
        ds.Modality, ds.InstanceNumber = "SM", i + 1
        ds.ImageType = (
            ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if i == 0 else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        )
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows, ds.TotalPixelMatrixFocalPlanes = width, height, 1
        ds.Columns = ds.Rows = tile_px
        ds.NumberOfFrames = across * down
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        measures = Dataset()
        measures.PixelSpacing = [f"{mpp * downsample / 1000:.10g}"] * 2  # mm, rows then columns
        measures.SliceThickness = "0.001"
        shared = Dataset()
        shared.PixelMeasuresSequence = [measures]
        ds.SharedFunctionalGroupsSequence = [shared]
        ds.PixelData = np.ascontiguousarray(frames).tobytes()
        paths.append(folder / f"level{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths[0]


def open_(path: Path, **kwargs) -> slides.Slide:
    return slides.open_slide(path, slide_id="s1", **kwargs)


# --------------------------------------------------------------------------------------------
# Layouts and resolution sources
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["CENTIMETER", "INCH"])
def test_generic_tiff_mpp_comes_from_its_resolution_tags(tmp_path, unit):
    path = write_tiff(tmp_path / "g.tiff", slide_image(0.5), mpp=0.5, unit=unit)
    with open_(path) as slide:
        info = slide.info
    assert info.vendor == "generic-tiff" and info.mpp == pytest.approx(0.5) and info.mpp_source == "openslide.mpp-x/y"
    assert (info.width_px, info.height_px) == (1792, 1344) and info.level_downsamples == pytest.approx((1.0, 4.0, 16.0))


def test_svs_layout_is_read_by_openslides_aperio_reader(tmp_path):
    path = write_svs(tmp_path / "a.svs", slide_image(0.25), mpp=0.25, downsamples=(1, 4, 16))
    with open_(path) as slide:
        info = slide.info
    with openslide.OpenSlide(path) as handle:  # the file's layout, as OpenSlide sees it
        associated, power = set(handle.associated_images), handle.properties["openslide.objective-power"]
    assert info.vendor == "aperio" and info.mpp == pytest.approx(0.25) and info.mpp_source == "openslide.mpp-x/y"
    assert len(info.level_downsamples) == 3 and info.level_downsamples == pytest.approx((1, 4, 16), rel=2e-3)
    assert associated == {"thumbnail", "label"} and power == "40"


def test_tiff_resolution_tags_are_used_when_the_vendor_reader_ignores_them(tmp_path):
    """An SVS without MPP but with resolution tags: the measured 0.3 µm/px, not 10/AppMag."""
    path = write_svs(tmp_path / "a.svs", slide_image(0.3), mpp=None, app_mag=20, resolution_mpp=0.3)
    with open_(path) as slide:
        assert slide.info.vendor == "aperio"
        assert slide.info.mpp == pytest.approx(0.3) and slide.info.mpp_source == "tiff.XResolution/YResolution"


def test_objective_power_alone_is_an_error_unless_allowed(tmp_path, caplog):
    path = write_svs(tmp_path / "a.svs", slide_image(0.5), mpp=None, app_mag=20)
    with pytest.raises(SlideError) as error:
        open_(path)
    assert str(error.value) == (
        f"slide 's1': {path} has no pixel size, only an objective power (20x); add an 'mpp' column (µm per pixel at level 0) "
        "to the sample sheet for this slide, or set tiling.allow_objective_power: true to assume 0.5 µm/px"
    )
    with caplog.at_level(logging.WARNING), open_(path, allow_objective_power=True) as slide:
        assert slide.info.mpp == 0.5 and slide.info.mpp_source == "openslide.objective-power"
    assert "assuming 0.5 µm/px from its objective power 20x" in caplog.text


def test_no_resolution_metadata_needs_the_sample_sheet_mpp(tmp_path):
    path = write_tiff(tmp_path / "n.tiff", slide_image(0.5), mpp=None)
    with pytest.raises(SlideError) as error:
        open_(path)
    assert str(error.value) == (
        f"slide 's1': {path} has no resolution metadata (openslide.mpp-x/y or TIFF resolution tags); "
        "add an 'mpp' column (µm per pixel at level 0) to the sample sheet for this slide"
    )
    with open_(path, mpp_override=0.5) as slide:
        assert slide.info.mpp == 0.5 and slide.info.mpp_source == "sample sheet"


def test_the_sample_sheet_mpp_wins_over_metadata_and_must_be_positive(tmp_path):
    path = write_tiff(tmp_path / "g.tiff", slide_image(0.5), mpp=0.5)
    with open_(path, mpp_override=0.52) as slide:
        assert slide.info.mpp == 0.52 and slide.info.mpp_source == "sample sheet"
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(SlideError, match=r"slide 's1': the sample sheet's mpp .* is not a positive number"):
            open_(path, mpp_override=bad)


def test_dicom_wsi_is_read_and_tiled(tmp_path):
    """A DICOM WSI written with pydicom (test-only dependency): OpenSlide's dicom reader gives
    the levels and the pixel size, and tiling it gives the 16 pink tiles as for a TIFF."""
    pytest.importorskip(
        "pydicom",
        reason="pydicom (test-only dependency, requirements-test.txt) is not installed: cannot write a DICOM WSI",
    )
    from wsiattack import tiling

    image = slide_image(0.25)
    path = write_dicom(tmp_path / "dicom", image, mpp=0.25, downsamples=(1, 4))
    with open_(path) as slide:
        info = slide.info
        region = slide.read_rgb(location=(0, 0), level=0, size=(info.width_px, info.height_px))
    assert info.vendor == "dicom" and info.mpp == pytest.approx(0.25) and info.mpp_source == "openslide.mpp-x/y"
    assert (info.width_px, info.height_px) == (3584, 2688) and info.level_downsamples == pytest.approx((1.0, 4.0))
    np.testing.assert_array_equal(region, image)  # uncompressed frames: exact, edge padding cropped
    spec = {
        "tile_px": 224,
        "target_mpp": 0.5,
        "mpp_tolerance": 0.05,
        "allow_objective_power": False,
        "skip_empty": False,
        "store_pixels": True,
        "tissue": {
            "method": "otsu",
            "min_fraction": 0.5,
            "thumbnail_mpp": 8.0,
            "min_object_um2": 20000.0,
            "max_hole_um2": 20000.0,
        },
    }
    out = tmp_path / "tiles.zarr"
    n = tiling.tile_slide(slide_id="s1", slide_path=path, spec=spec, out_store=out, out_qc=tmp_path / "qc.png")
    group = zarr.open_group(out, mode="r")
    tiles, coords = np.asarray(group["tiles"][...]), np.asarray(group["coords"][...])
    assert n == 16 and group.attrs["vendor"] == "dicom" and group.attrs["level"] == 0  # 0.25 µm/px, halved to 0.5
    np.testing.assert_array_equal(np.unique(coords[:, 0]), np.arange(2, 6) * 448)  # 112 µm = 448 px at 0.25 µm/px
    np.testing.assert_array_equal(np.unique(coords[:, 1]), np.arange(1, 5) * 448)
    assert np.abs(tiles.reshape(-1, 3).mean(0) - PINK).max() < 6


# --------------------------------------------------------------------------------------------
# Bad files
# --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(
        SlideError, match=r"^slide 's1': file not found: .*nope\.svs; fix its 'path' in the sample sheet$"
    ):
        open_(tmp_path / "nope.svs")


def test_text_file_named_svs(tmp_path):
    path = tmp_path / "notes.svs"
    path.write_text("this is not a slide\n")
    with pytest.raises(SlideError) as error:
        open_(path)
    assert (
        str(error.value)
        == f"slide 's1': {path} is not a slide format OpenSlide can read (e.g. .svs, .tif(f), .ndpi, .mrxs, .scn, .bif, DICOM)"
    )


def test_truncated_tiff_is_named_as_such(tmp_path):
    path = write_tiff(tmp_path / "t.tiff", slide_image(0.5), mpp=0.5)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SlideError) as error:
        open_(path)
    assert str(error.value) == (
        f"slide 's1': {path} is a TIFF file that OpenSlide cannot open: it is truncated or corrupt (re-copy it), "
        "or not a tiled, pyramidal slide"
    )


def corrupt_level0(path: Path) -> Path:
    """Overwrite the middle of level 0's tile data: the file opens, decoding those tiles fails."""
    with tifffile.TiffFile(path) as tif:
        offsets, counts = tif.pages[0].dataoffsets, tif.pages[0].databytecounts
    data = bytearray(path.read_bytes())
    for offset, count in list(zip(offsets, counts, strict=True))[len(offsets) // 3 :]:
        data[offset : offset + count] = bytes(count)
    path.write_bytes(bytes(data))
    return path


def test_corrupt_tile_data_fails_on_read_naming_the_slide(tmp_path):
    path = corrupt_level0(write_tiff(tmp_path / "c.tiff", slide_image(0.5), mpp=0.5))
    with open_(path) as slide:
        with pytest.raises(
            SlideError, match=r"^slide 's1': .*c\.tiff could not be decoded \(.*\); the file is corrupt or truncated"
        ):
            slide.read_rgb(location=(0, 0), level=0, size=(1792, 1344))


# --------------------------------------------------------------------------------------------
# Reads
# --------------------------------------------------------------------------------------------


def test_reads_outside_the_slide_are_white(tmp_path):
    path = write_tiff(tmp_path / "g.tiff", slide_image(0.5), mpp=0.5)
    with open_(path) as slide:
        region = slide.read_rgb(location=(1792 - 10, 0), level=0, size=(20, 5))
    assert (
        region.shape == (5, 20, 3)
        and (region[:, 10:] == 255).all()
        and (np.abs(region[:, :10].astype(int) - GLASS) <= 3).all()
    )


def test_over_white_composites_partial_alpha():
    rgba = Image.fromarray(np.array([[[0, 0, 0, 255], [0, 0, 0, 0], [100, 0, 200, 128]]], dtype=np.uint8), "RGBA")
    assert np.asarray(slides.over_white(rgba)).tolist() == [[[0, 0, 0], [255, 255, 255], [177, 127, 227]]]


@pytest.mark.parametrize("downsamples", [(1, 4, 16), (1,)])
def test_thumbnail_matches_a_box_filter_of_the_slide(tmp_path, downsamples, monkeypatch):
    """Also from a single-level slide, read in several bands (the band limit is lowered here)."""
    monkeypatch.setattr(slides, "_THUMBNAIL_BAND_PX", 200_000)
    image = slide_image(0.5)
    path = write_tiff(tmp_path / "g.tiff", image, mpp=0.5, downsamples=downsamples)
    with open_(path) as slide:
        thumb = slide.thumbnail(thumbnail_mpp=8.0, threads=2)
    assert thumb.shape == (84, 112, 3)
    expected = reduce(image, 16).astype(int)
    assert np.abs(thumb.astype(int) - expected).mean() < 2.0
    assert np.abs(thumb[20:60, 30:80].astype(int).mean(axis=(0, 1)) - PINK).max() < 4  # inside the rectangle


# --------------------------------------------------------------------------------------------
# Level choice and the thread pool
# --------------------------------------------------------------------------------------------


def info(mpp: float, downsamples: tuple[float, ...]) -> slides.SlideInfo:
    dims = tuple((round(10000 / d), round(8000 / d)) for d in downsamples)
    return slides.SlideInfo(
        slide_id="s1",
        path="x.svs",
        width_px=10000,
        height_px=8000,
        mpp=mpp,
        mpp_source="test",
        level_dimensions=dims,
        level_downsamples=downsamples,
        vendor="test",
    )


def test_choose_level_takes_the_coarsest_level_not_coarser_than_the_target():
    assert slides.choose_level(info(0.25, (1.0, 4.0, 16.0)), target_mpp=0.5, tolerance=0.05) == 0
    assert slides.choose_level(info(0.25, (1.0, 2.0, 8.0)), target_mpp=0.5, tolerance=0.05) == 1
    assert slides.choose_level(info(0.2635, (1.0, 1.9, 7.6)), target_mpp=0.5, tolerance=0.05) == 1  # 0.50065 µm/px
    assert slides.choose_level(info(0.2635, (1.0, 2.0, 8.0)), target_mpp=0.5, tolerance=0.05) == 0  # 0.527 > 0.525
    with pytest.raises(
        SlideError, match=r"^slide 's1': its finest resolution \(1 µm/px, from test\) is coarser than the target 0.5"
    ):
        slides.choose_level(info(1.0, (1.0, 4.0)), target_mpp=0.5, tolerance=0.05)


def test_map_bounded_keeps_order_bounds_the_queue_and_propagates_errors():
    in_flight = peak = 0
    lock = threading.Lock()

    def work(i: int) -> int:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.002 * (i % 3))
        return i * i

    results = []
    for value in slides.map_bounded(work, items=range(40), threads=3):
        results.append(value)
        with lock:
            in_flight -= 1
    assert results == [i * i for i in range(40)] and peak <= 2 * 3 + 1

    def fail(i: int) -> int:
        if i == 5:
            raise SlideError("slide 's1': broken")
        return i

    with pytest.raises(SlideError, match="broken"):
        list(slides.map_bounded(fail, items=range(100), threads=2))
