"""End to end through Snakemake's CLI on the tiny config: outputs, re-runs, the report, bad input.

Slow tier (a few minutes): `make test-fast` skips it.
"""

import base64
import io
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import ROOT, ok, run_snakemake
from small_tiny import TINY_CONFIG as TINY
from wsiattack import cluster, stores
from wsiattack.encoders import registry
from wsiattack.shards import partition, shard_of
from wsiattack.tilereader import TileReader

pytestmark = pytest.mark.slow


def snakemake(workdir: Path, *args: str, **options) -> subprocess.CompletedProcess:
    return run_snakemake(workdir, *args, **options)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("tiny")
    shutil.copy(TINY, workdir / "config.yaml")
    ok(snakemake(workdir))
    return workdir


def test_summary_has_every_metric_for_every_attack(tiny):
    summary = pd.read_csv(tiny / "results" / "summary.csv")
    assert list(summary.columns[:7]) == ["encoder", "mil", "attack", "metric", "clean", "attacked", "drop"]
    assert set(summary["attack"]) == {"pgd", "noise"}
    for _, rows in summary.groupby("attack"):
        assert list(rows["metric"]) == [
            "accuracy",
            "balanced_accuracy",
            "f1_macro",
            "auroc",
            "flip_rate",
            "tile_cosine_distance",
            "tile_linf",
            "tile_rms",
        ]
    values = summary[["clean", "attacked"]].to_numpy()
    assert np.all((values >= 0) & (values <= 1))
    shift = summary[summary["metric"] == "tile_cosine_distance"].set_index("attack")["attacked"]
    assert shift["pgd"] > 10 * shift["noise"]  # the attack beats its control where it acts: the embedding
    np.testing.assert_allclose(summary["drop"], summary["clean"] - summary["attacked"])
    for name in ("metrics.png", "examples/pgd/demo_trained.png", "examples/noise/demo_trained.png"):
        assert (tiny / "results" / "plots" / name).stat().st_size > 10_000


def test_the_analyses_cover_every_attack(tiny):
    summary = pd.read_csv(tiny / "results" / "summary.csv")
    for name in ("factors.png", "metrics.png"):
        assert (tiny / "results" / "plots" / name).stat().st_size > 10_000
    assert len(list((tiny / "results" / "plots" / "heatmaps").rglob("*.png"))) == summary["attack"].nunique()
    correlations = pd.read_csv(tiny / "results" / "vulnerability" / "demo_trained" / "pgd.correlations.csv")
    assert "tumor_fraction" in set(correlations["content"]) and (correlations["n_tiles"] > 0).all()


def test_stores_agree_with_each_other(tiny):
    evaluation = pd.read_csv(tiny / "results" / "eval" / "demo_trained" / "abmil" / "pgd.csv", dtype={"slide_id": str})
    assert len(evaluation) == 6 and set(evaluation["fold"]) == {0, 1}
    results = tiny / "results"
    n_shards = current_config(tiny).get("shards", 4)

    def shard_store(stage: str, slide: str, kind: str):
        shard = shard_of(slide, n_shards=n_shards)  # the per-slide store sits in its shard's directory
        return stores.open_store(results / stage / "demo_trained" / shard / f"{slide}.zarr", kind=kind)

    for slide in evaluation["slide_id"]:
        shard = shard_of(slide, n_shards=n_shards)
        tiles = stores.open_store(results / "tiles" / shard / f"{slide}.zarr", kind=stores.TILES)
        assert "tiles" not in tiles  # coordinates only by default: the pixels stay in the slide
        features = shard_store("features", slide, stores.FEATURES)
        attack = shard_store("attacks/pgd", slide, stores.ATTACK)
        noise = shard_store("attacks/noise", slide, stores.ATTACK)
        replaced = shard_store("reembedded/pgd", slide, stores.REEMBEDDED)
        reader = TileReader(
            results / "tiles" / shard / f"{slide}.zarr", slide_path=results / "demo" / "slides" / f"{slide}.tiff"
        )
        n = reader.shape[0]
        assert features["features"].shape == (n, 128) and features.attrs["encoder"] == "demo_trained"
        k = max(1, round(0.05 * n))
        np.testing.assert_array_equal(attack["index"][...], replaced["index"][...])
        np.testing.assert_array_equal(attack["index"][...], noise["index"][...])  # same tiles as the control
        assert replaced["features"].shape == (k, 128)
        assert np.abs(attack["adv_tiles"][...].astype(int) - reader.read(attack["index"][...]).astype(int)).max() <= 4
        assert (tiny / "results" / "qc" / shard / f"{slide}.png").exists()
    assert (evaluation["k"] >= 1).all()


def test_positive_control_flips_slides_its_noise_control_does_not(tiny, tmp_path):
    """The gray-box oracle must move slides if the chain can see an effect; noise of its bound must not."""
    run = copy_of_run(tiny, tmp_path)  # the shared run keeps its own attacks (the planning test counts their jobs)
    overlay = ROOT / "tests" / "configs" / "positive_control_tiny.yaml"
    evaluated = {
        name: Path("results/eval/demo_trained/abmil") / f"{name}.csv"
        for name in ("positive_control", "positive_control_noise")
    }
    ok(snakemake(run, *map(str, evaluated.values()), overlays=(overlay,)))
    evaluated = {name: run / path for name, path in evaluated.items()}
    oracle, noise = (pd.read_csv(path) for path in evaluated.values())
    assert (oracle["threat_model"] == "gray-box").all() and not oracle["label_free"].any()
    assert (oracle["clean_pred"] != oracle["attacked_pred"]).sum() >= 1
    assert (noise["clean_pred"] == noise["attacked_pred"]).all()

    def true_class_drop(frame: pd.DataFrame) -> np.ndarray:
        clean = np.where(frame["label_idx"] == 1, frame["clean_prob_tumor"], frame["clean_prob_normal"])
        attacked = np.where(frame["label_idx"] == 1, frame["attacked_prob_tumor"], frame["attacked_prob_normal"])
        return clean - attacked

    assert (true_class_drop(oracle) > true_class_drop(noise)).all()  # every slide, not only the flipped ones


def test_rerun_has_nothing_to_do(tiny):
    result = ok(snakemake(tiny, "--dry-run"))
    assert "Nothing to be done" in result.stdout + result.stderr


def test_report_builds(tiny):
    ok(snakemake(tiny, "--report", "report.html"))
    assert (tiny / "report.html").stat().st_size > 50_000


def _embedded_pngs(html: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r"data:image/png[^,\"]*;base64,([A-Za-z0-9+/=]+)", html)]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (make test installs it as root)")
def test_report_renders_in_headless_chromium(tiny, tmp_path):
    from PIL import Image

    report = tiny / "report_chromium.html"
    ok(snakemake(tiny, "--report", str(report)))
    browser = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=20000",
    ]
    dom = subprocess.run(
        [*browser, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    for category in ("Summary", "Heatmaps", "Vulnerability vs content", "Adversarial tiles"):
        assert category in dom, f"the rendered report has no {category!r} section"
    figures = _embedded_pngs(report.read_text())
    assert len(figures) >= 4
    for data in figures:  # every registered figure decodes as an image
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            assert min(image.size) > 50
    shot = tmp_path / "report.png"
    subprocess.run(
        [*browser, "--window-size=1400,1000", f"--screenshot={shot}", report.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    with Image.open(shot) as image:  # the page painted something, not a blank window
        assert len(set(image.convert("L").getdata())) > 10


def changed_benchmarks(workdir: Path, since: float) -> set[str]:
    """Jobs that ran since ``since``: every rule writes a benchmark file per job."""
    root = workdir / "results" / "benchmarks"
    return {str(p.relative_to(root)) for p in root.rglob("*.tsv") if p.stat().st_mtime > since}


def copy_of_run(tiny: Path, tmp_path: Path) -> Path:
    """A copy of the finished tiny run (outputs, mtimes and Snakemake's metadata): tests that edit
    the config or add outputs work on their own, so no later test depends on their order."""
    run = tmp_path / "tiny"
    shutil.copytree(tiny, run, symlinks=True)
    return run


def test_editing_one_attack_reruns_only_that_attack(tiny, tmp_path):
    run = copy_of_run(tiny, tmp_path)
    config = current_config(run)
    config["attacks"]["pgd"]["eps"] = "2/255"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    since = time.time()
    ok(snakemake(run))
    ran = changed_benchmarks(run, since)
    rules = {name.split("/")[0] for name in ran}
    assert rules == {
        "attack",
        "evaluate",
        "summarize",
        "plot_metrics",
        "plot_examples",
        "plot_factors",
        "plot_heatmaps",
        "vulnerability",
    }, ran
    assert all("pgd" in name for name in ran if not name.startswith(("summarize", "plot_metrics", "plot_factors"))), ran
    assert len([n for n in ran if n.startswith("attack/")]) == len(tiny_shards(tiny))  # one job per shard
    shard = shard_of("demo_000", n_shards=config.get("shards", 4))
    adv = stores.open_store(
        run / "results" / "attacks" / "pgd" / "demo_trained" / shard / "demo_000.zarr", kind=stores.ATTACK
    )
    assert adv.attrs["attack"]["eps"] == pytest.approx(2 / 255) and float(np.max(adv["linf"][...])) <= 2 / 255 + 1e-7


def test_stain_and_snap_attacks_and_their_controls_run_on_the_same_tiles_and_report_their_pixel_change(tiny, tmp_path):
    run = copy_of_run(tiny, tmp_path)
    config = current_config(run)
    budget = config["attacks"]["pgd"]["budget"]
    config["attacks"]["stain"] = {"method": "stain_pgd", "eps": 0.02, "steps": 3, "budget": budget}
    config["attacks"]["stain_control"] = {"method": "stain_jitter", "eps": 0.02, "budget": budget}
    config["attacks"]["snap"] = {"method": "snap", "eps": 0.05, "steps": 5, "budget": budget}
    config["attacks"]["snap_control"] = {"method": "snap_median", "eps": 0.05, "budget": budget}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    since = time.time()
    ok(snakemake(run))
    assert not [n for n in changed_benchmarks(run, since) if n.startswith(("tile/", "extract/", "train_mil/"))]
    summary = pd.read_csv(run / "results" / "summary.csv").set_index(["attack", "metric"])["attacked"]
    assert summary["stain", "tile_cosine_distance"] > 3 * summary["stain_control", "tile_cosine_distance"]
    assert (
        summary["pgd", "tile_linf"] <= 4 / 255 + 1e-6 < summary["stain", "tile_linf"]
    )  # a stain change is no L-inf ball
    shard = shard_of("demo_000", n_shards=config.get("shards", 4))
    attack, control = (
        stores.open_store(
            run / "results" / "attacks" / name / "demo_trained" / shard / "demo_000.zarr", kind=stores.ATTACK
        )
        for name in ("stain", "stain_control")
    )
    np.testing.assert_array_equal(attack["index"][...], control["index"][...])
    assert attack.attrs["bound"]["norm"] == "stain" and attack.attrs["method_params"]["step_size"] == pytest.approx(
        2.5 * 0.02 / 3
    )
    snap, snap_control = (
        stores.open_store(
            run / "results" / "attacks" / name / "demo_trained" / shard / "demo_000.zarr", kind=stores.ATTACK
        )
        for name in ("snap", "snap_control")
    )
    np.testing.assert_array_equal(snap["masks"][...], snap_control["masks"][...])  # same tiles, same masks
    masks, adv = np.asarray(snap["masks"][...]), np.asarray(snap["adv_tiles"][...])
    tiles_store = stores.find_slide_store(sorted((run / "results" / "tiles").iterdir()), "demo_000")
    with TileReader(tiles_store, slide_path=run / "results" / "demo" / "slides" / "demo_000.tiff") as tiles:
        clean = tiles.read(np.asarray(snap["index"][...]))
    assert (
        not ((adv != clean).any(axis=3) & (masks == 0)).any() and (masks.reshape(len(masks), -1).mean(1) <= 0.05).all()
    )
    assert summary["snap", "tile_cosine_distance"] > summary["snap_control", "tile_cosine_distance"]
    assert (run / "results" / "plots" / "examples" / "snap" / "demo_trained.png").is_file()


def test_transfer_matrix_perturbs_once_per_surrogate_and_its_diagonal_is_the_white_box_result(tiny, tmp_path):
    run = copy_of_run(tiny, tmp_path)
    config = current_config(run)
    config["transfer"] = {"surrogates": ["demo", "demo_trained"], "attacks": ["pgd"]}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    since = time.time()
    ok(snakemake(run))
    ran = changed_benchmarks(run, since)
    n_shards = len(tiny_shards(tiny))
    per_rule = {
        rule: len([n for n in ran if n.startswith(f"{rule}/")]) for rule in ("perturb_surrogate", "shuffle", "reembed")
    }
    assert per_rule == {"perturb_surrogate": 2 * n_shards, "shuffle": 2 * n_shards, "reembed": 4 * n_shards}, ran
    assert not [n for n in ran if n.startswith(("attack/", "extract/", "train_mil/"))], (
        ran
    )  # surrogates need no features

    evaluations = run / "results" / "eval" / "demo_trained" / "abmil"
    white, diagonal, transfer = (
        pd.read_csv(evaluations / f"{name}.csv", dtype={"slide_id": str}, keep_default_na=False)
        for name in ("pgd", "pgd_from_demo_trained", "pgd_from_demo")
    )
    scores = ["tile_cosine_distance", "attacked_prob_tumor", "tile_linf"]
    pd.testing.assert_frame_equal(white[scores], diagonal[scores])  # same tiles, same bytes, same features
    assert set(diagonal["threat_model"]) == {"white-box"} and set(transfer["threat_model"]) == {"black-box (transfer)"}
    assert set(transfer["surrogate"]) == {"demo"}

    matrix = pd.read_csv(run / "results" / "transfer.csv")
    cosine = matrix[matrix["metric"] == "tile_cosine_distance"].set_index("surrogate")
    assert cosine.loc["demo_trained", "percent_of_white_box"] == pytest.approx(100)
    assert 0 < cosine.loc["demo", "transfer"] < cosine.loc["demo", "white_box"]  # transfer is weaker than white-box
    assert (cosine["noise"] > 0).all() and (cosine["shuffled"] > 0).all()
    assert (run / "results" / "plots" / "transfer.png").stat().st_size > 10_000
    shard = shard_of("demo_000", n_shards=config.get("shards", 4))
    attacks = run / "results" / "attacks"
    source = stores.open_store(attacks / "pgd_from_demo" / "demo" / shard / "demo_000.zarr", kind=stores.ATTACK)
    shuffled = stores.open_store(
        attacks / "pgd_from_demo_shuffled" / "demo" / shard / "demo_000.zarr", kind=stores.ATTACK
    )
    np.testing.assert_array_equal(source["index"][...], shuffled["index"][...])
    assert source.attrs["encoder"]["encoder"] == "demo" and float(np.max(shuffled["linf"][...])) <= 4 / 255 + 1e-7


def test_a_universal_pattern_is_learned_per_fold_without_its_test_slides_and_added_to_them(tiny, tmp_path):
    run = copy_of_run(tiny, tmp_path)
    config = current_config(run)
    budget = config["attacks"]["pgd"]["budget"]
    config["attacks"]["uap"] = {"method": "universal", "eps": "4/255", "steps": 4, "train_tiles": 2, "batch_tiles": 4}
    config["attacks"]["uap"]["budget"] = budget
    config["attacks"]["uap_half"] = {**config["attacks"]["uap"], "budget": {"fraction": 0.5}}  # shares the patterns
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    since = time.time()
    ok(snakemake(run))
    ran = changed_benchmarks(run, since)
    per_rule = {
        rule: len([n for n in ran if n.startswith(f"{rule}/")])
        for rule in ("learn_universal", "apply_universal", "reembed", "attack", "extract", "train_mil")
    }
    n_shards, folds = len(tiny_shards(tiny)), config["mil"]["folds"]
    assert per_rule == {
        "learn_universal": folds,
        "apply_universal": 2 * n_shards,
        "reembed": 2 * n_shards,
        "attack": 0,
        "extract": 0,
        "train_mil": 0,
    }, ran
    splits = pd.read_csv(run / "results" / "splits.csv", dtype={"slide_id": str}).set_index("slide_id")["fold"]
    patterns = {
        fold: stores.open_store(
            run / "results" / "universal" / "uap" / "demo_trained" / f"fold{fold}.zarr", kind=stores.UNIVERSAL
        )
        for fold in range(folds)
    }
    for fold, pattern in patterns.items():
        assert not set(pattern.attrs["training_tiles"]) & set(splits.index[splits == fold])  # never its test slides
    for slide, fold in splits.items():
        attack = stores.open_store(
            stores.find_slide_store(sorted((run / "results" / "attacks" / "uap" / "demo_trained").iterdir()), slide),
            kind=stores.ATTACK,
        )
        tiles_store = stores.find_slide_store(sorted((run / "results" / "tiles").iterdir()), slide)
        slide_path = run / "results" / "demo" / "slides" / f"{slide}.tiff"  # the sheet's path is relative to the run
        with TileReader(tiles_store, slide_path=slide_path) as tiles:
            offsets = attack["adv_tiles"][...].astype(np.int16) - tiles.read(np.asarray(attack["index"][...]))
        inside = (attack["adv_tiles"][...] > 0) & (attack["adv_tiles"][...] < 255)  # not clipped
        pattern = np.broadcast_to(patterns[fold]["pattern"][...], offsets.shape)
        np.testing.assert_array_equal(offsets[inside], pattern[inside])
    summary = pd.read_csv(run / "results" / "summary.csv").set_index(["attack", "metric"])["attacked"]
    assert summary["uap", "tile_cosine_distance"] > 10 * summary["noise", "tile_cosine_distance"]
    assert summary["uap", "tile_linf"] <= 4 / 255 + 1e-6
    assert (run / "results" / "plots" / "universal" / "uap" / "demo_trained.png").stat().st_size > 10_000


def test_backdoor_branch_poisons_only_training_slides_and_its_clean_head_is_the_workflows_head(tiny, tmp_path):
    run = copy_of_run(tiny, tmp_path)
    config = current_config(run)
    config["backdoor"] = {"triggers": ["bapl", "patch"], "tile_fraction": 0.1}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    since = time.time()
    ok(snakemake(run))
    ran = {name.split("/")[0] for name in changed_benchmarks(run, since)}
    assert ran == {"backdoor", "backdoor_clean_head", "backdoor_table", "plot_backdoor_trigger"}, ran
    out = run / "results" / "backdoor" / "demo_trained" / "abmil"
    splits = pd.read_csv(run / "results" / "splits.csv", dtype={"slide_id": str}).set_index("slide_id")
    for trigger in ("bapl", "patch"):
        for target in ("normal", "tumor"):
            store = stores.open_store(out / trigger / target / "shots_all.zarr", kind=stores.BACKDOOR)
            for fold, record in store.attrs["folds"].items():
                poisoned = record["poisoned_slides"]
                assert len(poisoned) == 1 and set(poisoned) <= set(record["train_slides"])
                assert (splits.loc[poisoned, "fold"] != int(fold)).all()  # never a test slide
                assert (splits.loc[poisoned, "label"] != target).all()  # never of the target class
                assert record["noise_steps"] == (record["best_epoch"] if trigger == "bapl" else 0)  # kept with the head
            delta = np.asarray(store["delta"][...])
            assert (np.abs(delta).max() <= 8 / 255 + 1e-7) and ((np.abs(delta).max() > 0) == (trigger == "bapl"))
    # nothing poisoned, the same training: the clean head is train_mil's head, slide for slide
    clean = pd.read_csv(out / "clean" / "shots_all.csv", dtype={"slide_id": str}).set_index("slide_id")
    evaluated = pd.read_csv(run / "results" / "eval" / "demo_trained" / "abmil" / "pgd.csv", dtype={"slide_id": str})
    evaluated = evaluated.set_index("slide_id").loc[clean.index]
    for name in ("normal", "tumor"):
        np.testing.assert_allclose(clean[f"clean_prob_{name}"], evaluated[f"clean_prob_{name}"], atol=1e-6)
    table = pd.read_csv(run / "results" / "backdoor.csv")
    assert len(table) == 3 * 3 and set(table["trigger"]) == {"clean", "bapl", "patch"}  # 2 targets + their mean
    assert (table.loc[table["trigger"] == "clean", "clean_accuracy_change"] == 0).all()
    rows = table[table["target"] != "mean"]
    assert (rows["n_slides"] == len(splits)).all()
    assert (rows["n_poisoned"] == np.where(rows["trigger"] == "clean", 0, config["mil"]["folds"])).all()
    low, value, high = (rows[f"backdoor_accuracy{end}"] for end in ("_ci_low", "", "_ci_high"))
    assert ((low <= value) & (value <= high)).all()
    assert (run / "results" / "plots" / "backdoor" / "demo_trained_trigger.png").stat().st_size > 10_000
    # the noise's radius concerns the noise-learning triggers only
    config["backdoor"]["eps"] = "4/255"
    jobs = planned_jobs(run, config)
    assert jobs == {"backdoor": 2, "backdoor_table": 1, "plot_backdoor_trigger": 1, "all": 1}, jobs


@pytest.fixture
def user_cohort(tiny, tmp_path) -> Path:
    """A user's own sample sheet over the tiny run's slides, in a fresh work directory."""
    config = yaml.safe_load(TINY.read_text())
    config["samples"] = "samples.csv"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    sheet = pd.read_csv(tiny / "results" / "demo" / "samples.csv")
    sheet["path"] = [str(tiny / "results" / "demo" / p) for p in sheet["path"]]
    sheet.to_csv(tmp_path / "samples.csv", index=False)
    return tmp_path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: pd.concat([s, s.iloc[:1]]), r"duplicate slide_id 'demo_000'"),
        (
            lambda s: s.assign(label=["normal", "tumor", "cancer", "normal", "tumor", "normal"]),
            r"line 4: slide 'demo_002': label 'cancer' is not one of",
        ),
        (
            lambda s: s.assign(path=[*s["path"][:5], "/nonexistent/x.svs"]),
            r"slide 'demo_005': file not found: /nonexistent/x\.svs",
        ),
    ],
)
def test_bad_sample_sheet_fails_at_start_naming_the_row(user_cohort, edit, message):
    sheet = edit(pd.read_csv(user_cohort / "samples.csv"))
    sheet.to_csv(user_cohort / "samples.csv", index=False)
    result = snakemake(user_cohort)
    assert result.returncode != 0
    assert re.search(message, result.stdout + result.stderr), result.stderr[-3000:]
    assert not (user_cohort / "results").exists()  # nothing partial


def test_unknown_config_key_fails_at_start(user_cohort):
    config = yaml.safe_load((user_cohort / "config.yaml").read_text())
    config["attacks"]["pgd"]["epz"] = 1
    (user_cohort / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(user_cohort)
    assert result.returncode != 0
    assert (
        "config: attacks.pgd: Additional properties are not allowed ('epz' was unexpected)"
        in result.stdout + result.stderr
    )


def test_unreadable_slide_fails_its_job_and_leaves_no_store(user_cohort):
    (user_cohort / "notes.svs").write_text("not a slide")
    sheet = pd.read_csv(user_cohort / "samples.csv")
    sheet.loc[0, "path"] = str(user_cohort / "notes.svs")
    sheet.to_csv(user_cohort / "samples.csv", index=False)
    shard = shard_of("demo_000", n_shards=current_config(user_cohort).get("shards", 4))
    result = snakemake(user_cohort, f"results/tiles/{shard}")
    assert result.returncode != 0
    assert "slide 'demo_000': " in result.stderr and "is not a slide format OpenSlide can read" in result.stderr
    # the shard's tile job fails as a whole: no directory, no half-written store of its other slides
    assert not (user_cohort / "results" / "tiles" / shard).exists()
    assert not list((user_cohort / "results").rglob(".*tmp*"))


def test_gpu_jobs_ask_for_memory_by_their_encoders_size(user_cohort):
    """Without a profile, a GPU rule's mem_mb is the base plus its encoder's weights (wsiattack.cluster)."""
    (user_cohort / "uni.safetensors").touch()  # preflight only needs the file to exist; nothing runs
    config = current_config(user_cohort) | {
        "encoders": ["demo_trained", "uni"],
        "encoder_weights": {"uni": "uni.safetensors"},
    }
    path = user_cohort / "two_encoders.yaml"
    path.write_text(yaml.safe_dump(config))
    out = ok(snakemake(user_cohort, "--dry-run", config=path)).stdout
    asked = {
        (re.search(r"encoder=(\w+)", job).group(1), int(re.search(r"mem_mb=(\d+)", job).group(1)))
        for job in out.split("\nrule ")
        if job.startswith("extract:")
    }
    assert asked == {
        (name, cluster.GPU_JOB_BASE_MB + cluster.encoder_host_mb(registry.get_spec(name)))
        for name in ("demo_trained", "uni")
    }
    assert dict(asked)["uni"] == 4500


def planned_jobs(workdir: Path, config: dict) -> dict[str, int]:
    """Jobs per rule that Snakemake would run for ``config`` (dry run, nothing executed)."""
    path = workdir / "edited.yaml"
    path.write_text(yaml.safe_dump(config))
    result = ok(snakemake(workdir, "--dry-run", config=path))
    out = result.stdout + result.stderr
    if "Nothing to be done" in out:
        return {}
    table = out[out.index("Job stats:") :].split("\n\n")[0].splitlines()[3:]
    return {rule: int(count) for rule, count in (line.split() for line in table) if rule != "total"}


def current_config(workdir: Path) -> dict:
    return yaml.safe_load((workdir / "config.yaml").read_text())


def tiny_shards(workdir: Path) -> dict[str, list[str]]:
    slides = pd.read_csv(workdir / "results" / "demo" / "samples.csv", dtype={"slide_id": str})["slide_id"]
    return partition(slides, n_shards=current_config(workdir).get("shards", 4))


def test_editing_mil_settings_reruns_no_slide_level_job(tiny):
    config = current_config(tiny)
    config["mil"]["epochs"] = 7
    jobs = planned_jobs(tiny, config)
    assert jobs == {
        "train_mil": 2,
        "evaluate": 2,
        "plot_heatmaps": 2,
        "summarize": 1,
        "plot_metrics": 1,
        "plot_factors": 1,
        "all": 1,
    }, jobs


def test_editing_tiling_reruns_every_slide(tiny):
    config = current_config(tiny)
    config["tiling"]["tissue"]["min_fraction"] = 0.6
    jobs = planned_jobs(tiny, config)
    n_shards = len(tiny_shards(tiny))
    assert 1 < n_shards < 6  # the tiny cohort's 6 slides fall into a few shards
    for rule, count in {
        "tile": n_shards,
        "extract": n_shards,
        "attack": 2 * n_shards,
        "train_mil": 2,
        "evaluate": 2,
    }.items():
        assert jobs.get(rule) == count, jobs
    assert "demo_cohort" not in jobs


def test_adding_a_slide_runs_only_its_jobs_and_the_cohort_level_ones(tiny):
    demo = tiny / "results" / "demo"
    sheet = pd.read_csv(demo / "samples.csv")
    shutil.copy(demo / "slides" / "demo_000.tiff", tiny / "extra.tiff")
    sheet["path"] = [f"results/demo/{p}" for p in sheet["path"]]  # relative to grown.csv's folder
    sheet = pd.concat(
        [sheet, pd.DataFrame([{"slide_id": "extra", "path": "extra.tiff", "label": sheet.loc[0, "label"]}])]
    )
    sheet.to_csv(tiny / "grown.csv", index=False)
    config = current_config(tiny)
    config["samples"] = "grown.csv"
    jobs = planned_jobs(tiny, config)
    # one tile job, and one GPU job per (encoder, attack) for the one shard the slide joins
    assert {r: jobs.get(r) for r in ("tile", "extract", "attack")} == {"tile": 1, "extract": 1, "attack": 2}, jobs
    assert jobs["split"] == 1 and jobs["train_mil"] == 2 and jobs["evaluate"] == 2


def test_pilot_costs_come_from_every_gradient_job_of_the_run(tiny):
    from wsiattack import planning

    costs = planning.pilot_costs(tiny / "results", encoder="demo_trained")
    n_shards = len(tiny_shards(tiny))
    assert costs["extract_jobs"] == n_shards and costs["attack_jobs"] == n_shards  # noise has no gradient: left out
    assert 3 <= costs["gradient_evaluations_per_tile"] <= 4  # tiny's PGD: 3 steps (+ the random start's)
    assert costs["extract_s_per_tile"] > 0 and costs["attack_s_per_gradient_evaluation"] > 0
    assert costs["tiles_per_slide"] == pytest.approx(
        np.mean(
            [
                stores.open_store(p, kind=stores.TILES)["coords"].shape[0]
                for p in stores.slide_stores(sorted((tiny / "results" / "tiles").glob("shard-*")))
            ]
        )
    )


def test_defences_are_evaluated_both_ways_and_an_attacker_setting_reruns_only_the_adaptive_side(tiny, tmp_path):
    run = copy_of_run(tiny, tmp_path)
    config = current_config(run)
    overlay = yaml.safe_load((ROOT / "tests" / "configs" / "defences_tiny.yaml").read_text())
    config["attacks"].update(overlay["attacks"])
    config["defences"] = overlay["defences"]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    since = time.time()
    ok(snakemake(run))
    ran = {name.split("/")[0] for name in changed_benchmarks(run, since)}
    assert {"extract_defended", "reembed_defended", "attack_defended", "evaluate_defended", "defence_table"} <= ran
    assert not ran & {"tile", "extract", "train_mil"}, ran  # the defences reuse the clean chain
    table = pd.read_csv(run / "results" / "defences.csv")
    pairs = set(zip(table["defence"], table["attack"], strict=True))
    assert pairs == {(d, a) for d in ("median", "knn") for a in ("pgd", "pgd_oracle")} | {("drop_top", "pgd_oracle")}
    assert table.groupby(["defence", "attack"]).size().nunique() == 1 and (table["n_slides"] == 6).all()
    shift = table[table["metric"] == "tile_cosine_distance"].set_index(["defence", "attack"])
    # median smoothing is differentiable: attacking through it moves the defended embedding further
    assert shift.loc[("median", "pgd"), "attacked_adaptive"] > shift.loc[("median", "pgd"), "attacked_nonadaptive"]
    head_defences = shift[shift["kind"].isin(["drop_top_attended", "knn_filter"])]  # the attack's own rows
    np.testing.assert_allclose(head_defences["attacked_nonadaptive"], head_defences["attacked"], rtol=1e-5)
    for defence, attack in pairs:  # the clean side of a defence does not depend on how it is attacked
        evals = run / "results" / "defences" / "eval" / "demo_trained" / "abmil" / defence
        both = [
            pd.read_csv(evals / mode / f"{attack}.csv").filter(regex="^clean_(pred|prob_)")
            for mode in ("nonadaptive", "adaptive")
        ]
        pd.testing.assert_frame_equal(*both)
    knn = pd.read_csv(run / "results" / "defences" / "eval" / "demo_trained" / "abmil" / "knn" / "adaptive" / "pgd.csv")
    assert knn["detection_auroc"].between(0, 1).all() and (knn["detected"] <= knn["k"]).all()
    assert (run / "results" / "plots" / "defences.png").stat().st_size > 10_000
    # the adaptive attacker's settings re-run its attacks only: no randomised defence uses eot_samples
    config["defences"]["eot_samples"] = 3
    assert planned_jobs(run, config) == {}
    config["defences"]["detection_weight"] = 5.0
    n_shards = len(tiny_shards(run))
    assert planned_jobs(run, config) == {
        "attack_defended": 3 * n_shards,  # drop_top x pgd_oracle, knn x both attacks
        "evaluate_defended": 3,
        "defence_table": 1,
        "all": 1,
    }
