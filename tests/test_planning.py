"""Planning a study: the dry run's job counts follow the study's factors; the estimate scales."""

import pytest
from wsiattack import planning

COSTS = {
    "extract_start_up_s": 10.0,
    "extract_s_per_tile": 0.01,
    "attack_start_up_s": 20.0,
    "attack_s_per_gradient_evaluation": 0.05,
    "tiles_per_slide": 1000.0,
    "gradient_evaluations_per_tile": 10.0,
}


def test_estimate_is_start_up_per_job_plus_work_per_tile():
    hours = planning.estimate_hours(COSTS, n_slides=100, n_encoders=2, n_attacks=3, n_shards=4, fraction=0.001)
    assert hours["attacked_tiles_per_slide"] == 1
    # extraction: 2 encoders x (100 slides x 1000 tiles x 0.01 s + 4 jobs x 10 s)
    assert hours["extract_hours"] * 3600 == pytest.approx(2 * (100 * 1000 * 0.01 + 4 * 10))
    # attack: 2 x 3 x (100 slides x 1 tile x 10 evaluations x 0.05 s + 4 jobs x 20 s)
    assert hours["attack_hours"] * 3600 == pytest.approx(6 * (100 * 1 * 10 * 0.05 + 4 * 20))
    more = planning.estimate_hours(
        COSTS, n_slides=100, n_encoders=2, n_attacks=3, n_shards=4, fraction=0.01, tiles_per_slide=2000
    )
    assert more["attacked_tiles_per_slide"] == 20


def test_fit_recovers_start_up_and_unit_cost_from_jobs_of_different_sizes():
    start_up, per_unit = planning._fit_start_up([(100, 7.0), (300, 11.0), (200, 9.0)])
    assert start_up == pytest.approx(5.0) and per_unit == pytest.approx(0.02)
    assert planning._fit_start_up([(100, 4.0), (100, 6.0)]) == (0.0, pytest.approx(0.05))  # one size: no start-up
    # times that shrink with the work (start-up plus timing noise, seen on a loaded 2-core run) give
    # no per-unit cost to fit: the mean rate, never a negative cost
    assert planning._fit_start_up([(30, 9.0), (60, 8.5), (45, 8.8)]) == (0.0, pytest.approx(26.3 / 135))


@pytest.mark.slow
def test_dry_run_of_a_small_study_counts_one_gpu_job_per_shard(tmp_path):
    config = planning.write_study(tmp_path, n_slides=40, n_encoders=2, n_attacks=3, n_shards=4)
    report = planning.dry_run(tmp_path, config)
    jobs = report["jobs"]
    assert {rule: jobs[rule] for rule in ("tile", "extract", "attack", "train_mil", "evaluate")} == {
        "tile": 4,
        "extract": 2 * 4,
        "attack": 2 * 3 * 4,
        "train_mil": 2 * 5,
        "evaluate": 2 * 3,
    }
    assert report["dag_build_s"] > 0 and report["peak_rss_mb"] > 50
