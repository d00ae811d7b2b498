"""Shards and the GPU rules' per-shard jobs: stable partition, both tiles-store modes give the same
features, perturb + re-embed in one process, and a job that fails mid-shard leaves nothing."""

import numpy as np
import pytest
import torch
from test_slides import slide_image, write_tiff
from test_tiling import PIXELS_SPEC, SPEC
from wsiattack import shardjobs, stores, tiling
from wsiattack.encoders.model import build_encoder
from wsiattack.errors import StoreError
from wsiattack.shards import partition, shard_of
from wsiattack.tilereader import TileReader

CPU = torch.device("cpu")
PGD = {
    "name": "pgd",
    "method": "pgd",
    "objective": "cosine",
    "eps": 4 / 255,
    "steps": 1,
    "step_size": 1 / 255,
    "budget": {"fraction": 0.1, "min_tiles": 1},
    "selection": "random",
    "seed": 0,
}


def test_a_slide_s_shard_depends_only_on_its_id_and_adding_one_changes_one_shard():
    ids = [f"slide_{i}" for i in range(200)]
    before = partition(ids, n_shards=8)
    assert sorted(s for members in before.values() for s in members) == sorted(ids)
    assert all(len(members) > 10 for members in before.values())  # hashing spreads 200 slides over all 8
    assert shard_of("slide_0", n_shards=8) == "shard-0003"  # fixed forever: output paths depend on it
    after = partition([*ids, "new"], n_shards=8)
    changed = [shard for shard in after if after[shard] != before.get(shard)]
    assert changed == [shard_of("new", n_shards=8)] and after[changed[0]][-1] == "new"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two slides tiled both ways: coordinates only (the default) and with stored pixels."""
    root = tmp_path_factory.mktemp("cohort")
    slides = []
    for i in range(2):
        path = write_tiff(root / f"s{i}.tiff", slide_image(0.5, seed=i), mpp=0.5)
        for mode, spec in (("coords", SPEC), ("pixels", PIXELS_SPEC)):
            (root / mode).mkdir(exist_ok=True)
            tiling.tile_slide(
                slide_id=f"s{i}",
                slide_path=path,
                spec=spec,
                out_store=root / mode / f"s{i}.zarr",
                out_qc=root / mode / f"s{i}.png",
            )
        slides.append(path)
    return root, slides


def shard_of_cohort(root, slides, mode):
    return shardjobs.shard_slides(
        ["s0", "s1"], [root / mode / "s0.zarr", root / mode / "s1.zarr"], slides if mode == "coords" else None
    )


@pytest.fixture(scope="module")
def demo():
    torch.set_num_threads(1)
    return build_encoder("demo")


def test_both_tiles_store_modes_give_identical_features(cohort, demo, tmp_path):
    root, slides = cohort
    for mode in ("coords", "pixels"):
        n = shardjobs.extract_shard(
            slides=shard_of_cohort(root, slides, mode),
            encoder=demo,
            batch_size=5,
            device=CPU,
            out_dir=tmp_path / mode,
            reader_threads=2,
        )
        assert n == 32
    for slide in ("s0", "s1"):
        a, b = (
            np.asarray(stores.open_store(tmp_path / mode / f"{slide}.zarr", kind=stores.FEATURES)["features"][...])
            for mode in ("coords", "pixels")
        )
        np.testing.assert_array_equal(a, b)
    assert [p.name for p in stores.slide_stores([tmp_path / "coords"])] == ["s0.zarr", "s1.zarr"]


def test_attack_shard_perturbs_and_reembeds_every_slide_in_one_process(cohort, demo, tmp_path):
    root, slides = cohort
    shard = shard_of_cohort(root, slides, "coords")
    k = shardjobs.attack_shard(
        slides=shard,
        encoder=demo,
        spec=PGD,
        batch_size=4,
        device=CPU,
        out_attacks=tmp_path / "a",
        out_reembedded=tmp_path / "r",
    )
    assert k == 4  # 10 % of 16 tiles, rounded: 2 per slide
    for slide in shard:
        attack = stores.open_store(tmp_path / "a" / f"{slide.slide_id}.zarr", kind=stores.ATTACK)
        replaced = stores.open_store(tmp_path / "r" / f"{slide.slide_id}.zarr", kind=stores.REEMBEDDED)
        index = np.asarray(attack["index"][...])
        np.testing.assert_array_equal(index, replaced["index"][...])
        with TileReader(slide.tiles_store, slide_path=slide.slide_path) as reader:
            clean = reader.read(index).astype(int)
        assert 0 < np.abs(attack["adv_tiles"][...].astype(int) - clean).max() <= 4
        with torch.no_grad():  # the re-embedded rows are the encoder's features of the stored uint8 tiles
            direct = demo(
                torch.from_numpy(np.asarray(attack["adv_tiles"][...])).permute(0, 3, 1, 2).float() / 255
            ).numpy()
        np.testing.assert_allclose(replaced["features"][...], direct, rtol=1e-4, atol=1e-5)


def test_a_job_failing_mid_shard_leaves_no_output_and_no_debris(cohort, demo, tmp_path):
    root, slides = cohort
    moved = tmp_path / "elsewhere.tiff"  # the second slide is not where the sample sheet says
    shard = shard_of_cohort(root, slides, "coords")
    shard[1] = shardjobs.ShardSlide("s1", shard[1].tiles_store, str(moved))
    with pytest.raises(StoreError, match=r"elsewhere\.tiff is missing"):
        shardjobs.extract_shard(slides=shard, encoder=demo, batch_size=8, device=CPU, out_dir=tmp_path / "features")
    assert list(tmp_path.iterdir()) == []  # not even the finished first slide: the shard is one unit
