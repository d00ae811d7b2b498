"""Transfer attacks and the shuffled control: the config's expansion and checks, the shuffle's
exactness, and the transfer matrix from a summary."""

import copy

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import ROOT
from wsiattack import config as wsiconfig
from wsiattack.attacks.params import threat_marking
from wsiattack.attacks.shuffle import shuffle_perturbation
from wsiattack.errors import ConfigError
from wsiattack.transfertable import transfer_matrix

TINY = yaml.safe_load((ROOT / "tests" / "configs" / "tiny.yaml").read_text())


def with_transfer(transfer=None, **attacks):
    config = copy.deepcopy(TINY)
    config["attacks"].update(attacks)
    if transfer is not None:
        config["transfer"] = transfer
    return config


def test_the_transfer_block_expands_into_one_entry_per_attack_and_surrogate_with_its_control():
    config = wsiconfig.validate_config(with_transfer({"surrogates": ["demo", "demo_trained"], "attacks": ["pgd"]}))
    attacks = config["attacks"]
    assert set(attacks) == {
        "pgd",
        "noise",
        "pgd_from_demo",
        "pgd_from_demo_trained",
        "pgd_from_demo_shuffled",
        "pgd_from_demo_trained_shuffled",
    }
    assert {k: v for k, v in attacks["pgd_from_demo"].items() if k != "surrogate"} == attacks["pgd"]
    shuffled = attacks["pgd_from_demo_trained_shuffled"]
    assert shuffled["source"] == "pgd_from_demo_trained" and shuffled["surrogate"] == "demo_trained"
    assert shuffled["budget"] == attacks["pgd"]["budget"] and shuffled["eps"] == attacks["pgd"]["eps"]
    assert threat_marking(attacks["pgd_from_demo_trained"], encoder="demo")["threat_model"] == "black-box (transfer)"
    plain = wsiconfig.validate_config(
        with_transfer({"surrogates": ["demo"], "attacks": ["pgd"], "shuffled_control": False})
    )
    assert set(plain["attacks"]) == {"pgd", "noise", "pgd_from_demo"}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            with_transfer({"surrogates": ["nope"], "attacks": ["pgd"]}),
            r"transfer \(pgd_from_nope\)\.surrogate: unknown encoder 'nope'",
        ),
        (
            with_transfer({"surrogates": ["demo"], "attacks": ["missing"]}),
            r"transfer\.attacks: 'missing' is not an attack",
        ),
        (
            with_transfer(
                oracle={"method": "pgd", "eps": "4/255", "objective": "mil_cross_entropy", "surrogate": "demo"}
            ),
            r"attacks\.oracle\.surrogate: a transfer attack is crafted without the target's MIL head",
        ),
        (with_transfer(sh={"method": "shuffled", "eps": "4/255"}), r"attacks\.sh\.source: method 'shuffled' needs"),
        (
            with_transfer(sh={"method": "shuffled", "eps": "2/255", "source": "pgd"}),
            r"attacks\.sh\.eps: must be the source's",
        ),
        (
            with_transfer(sh={"method": "pgd", "eps": "4/255", "source": "pgd"}),
            r"attacks\.sh\.source: not a parameter of method 'pgd'",
        ),
        (
            with_transfer({"surrogates": ["demo"], "attacks": ["pgd"]}, pgd_from_demo={"method": "noise", "eps": 0}),
            r"transfer: entry 'pgd_from_demo' has the name of an attack under attacks",
        ),
    ],
)
def test_bad_transfer_and_shuffled_entries_name_the_culprit(config, message):
    with pytest.raises(ConfigError, match=message):
        wsiconfig.validate_config(config)


def test_the_shuffle_keeps_every_offset_and_moves_it_where_nothing_clips():
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    clean[0] = np.clip(clean[0], 8, 247)  # tile 0 cannot clip at +-8
    offsets = rng.integers(-8, 9, clean.shape)
    offsets[:, :8] = 0  # structure: only the lower half is perturbed
    adversarial = np.clip(clean.astype(int) + offsets, 0, 255).astype(np.uint8)
    shuffled, permuted, clipped = shuffle_perturbation(clean, adversarial, rng=np.random.default_rng(1))
    source = adversarial.astype(int) - clean.astype(int)
    for i in range(3):  # the same multiset of RGB offset triples, in other places
        rows = lambda a: np.sort(a.reshape(-1, 3).view([("r", a.dtype), ("g", a.dtype), ("b", a.dtype)]), axis=0)  # noqa: E731
        np.testing.assert_array_equal(rows(permuted[i].astype(np.int64)), rows(source[i].astype(np.int64)))
    assert not np.array_equal(permuted, source)
    assert clipped[0] == 0 and np.array_equal(shuffled[0].astype(int) - clean[0], permuted[0])
    assert np.abs(permuted[:, :8]).sum() > 0  # the structure is gone: the upper half is perturbed too
    assert np.array_equal(shuffled, np.clip(clean.astype(int) + permuted, 0, 255))
    again = shuffle_perturbation(clean, adversarial, rng=np.random.default_rng(1))[0]
    assert np.array_equal(shuffled, again)


def summary_rows(attack, encoder, *, drop, flips, cosine):
    base = {"encoder": encoder, "mil": "abmil", "attack": attack, "n_slides": 20}
    return [
        {
            **base,
            "metric": "accuracy",
            "clean": 0.9,
            "attacked": 0.9 - drop,
            "drop": drop,
            "drop_ci_low": drop - 0.1,
            "drop_ci_high": drop + 0.1,
        },
        {
            **base,
            "metric": "flip_rate",
            "clean": 0.0,
            "attacked": flips,
            "drop": -flips,
            "drop_ci_low": -flips - 0.2,
            "drop_ci_high": -flips + 0.05,
        },
        {
            **base,
            "metric": "tile_cosine_distance",
            "clean": 0.0,
            "attacked": cosine,
            "drop": -cosine,
            "drop_ci_low": np.nan,
            "drop_ci_high": np.nan,
        },
    ]


def test_the_transfer_matrix_sets_each_cell_against_its_white_box_shuffled_and_noise_controls():
    config = wsiconfig.validate_config(with_transfer({"surrogates": ["demo"], "attacks": ["pgd"]}))
    summary = pd.DataFrame(
        summary_rows("pgd", "demo_trained", drop=0.2, flips=0.3, cosine=0.04)
        + summary_rows("pgd_from_demo", "demo_trained", drop=0.05, flips=0.1, cosine=0.01)
        + summary_rows("pgd_from_demo_shuffled", "demo_trained", drop=0.0, flips=0.0, cosine=0.002)
        + summary_rows("noise", "demo_trained", drop=0.0, flips=0.05, cosine=0.0001)
    )
    matrix = transfer_matrix(summary, transfer=config["transfer"], attacks=config["attacks"]).set_index("metric")
    assert matrix.loc["tile_cosine_distance", "percent_of_white_box"] == pytest.approx(25)
    assert matrix.loc["accuracy", "percent_of_white_box"] == pytest.approx(25)
    flips = matrix.loc["flip_rate"]
    assert (flips["transfer"], flips["white_box"], flips["shuffled"], flips["noise"]) == pytest.approx(
        (0.1, 0.3, 0.0, 0.05)
    )
    assert (flips["transfer_ci_low"], flips["transfer_ci_high"]) == pytest.approx((0.05, 0.3))
    assert set(matrix["surrogate"]) == {"demo"} and set(matrix["target"]) == {"demo_trained"}
