"""Defences: each transform against a reference (PIL, scipy.ndimage, scikit-image or a hand
computation), BPDA and EOT for the adaptive attacker, gradient masking shown on a toy, robust
aggregation through a real MIL head, and the in-slide kNN detector with its adaptive evasion."""

import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi
import torch
from skimage.color import lab2rgb, rgb2lab
from torch import nn
from wsiattack.attacks.driver import Problem
from wsiattack.attacks.methods import build_method
from wsiattack.attacks.objectives import cosine_distance
from wsiattack.defences.aggregation import DropTopAttended, FilteredHead, drop_evasion
from wsiattack.defences.detection import (
    detection_aware,
    detector_roc,
    knn_outlier_scores,
    scores_against,
    slide_detection,
    threshold_at_fpr,
)
from wsiattack.defences.pipeline import pipeline_of
from wsiattack.defences.transforms import (
    JPEG,
    BitDepth,
    DefendedEncoder,
    GaussianBlur,
    GaussianNoise,
    MedianBlur,
    Reinhard,
    build_defence,
    jpeg_round_trip,
    lab_to_rgb,
    rgb_to_lab,
)
from wsiattack.errors import AttackError
from wsiattack.mil.models import build_mil_model
from wsiattack.synthetic import render_slide

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def he_tiles():
    """Eight 64 px tiles of a synthetic H&E slide with tumour, (8, 3, 64, 64) in [0, 1]."""
    image = render_slide(rng=np.random.default_rng(3), width_px=256, height_px=256, tumor=True, tumor_share=0.3)
    tiles = image.reshape(4, 64, 4, 64, 3).swapaxes(1, 2).reshape(16, 64, 64, 3)[:8]
    return torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255


class TinyCNN(nn.Module):
    """A seeded random two-layer CNN: non-linear like an encoder, a thousand times cheaper."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 5, stride=2), nn.GELU(), nn.Conv2d(16, 32, 3, stride=2), nn.GELU())

    def forward(self, x):
        features = self.net(x)
        return torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)


@pytest.fixture(scope="module")
def tiny():
    return TinyCNN().eval().requires_grad_(False)


def per_channel(reference, x):
    """``reference`` (a 2-D filter) applied to every channel of every tile of ``x`` (B, 3, H, W)."""
    return np.stack([[reference(channel) for channel in tile] for tile in x.numpy().astype(np.float64)])


def test_smoothing_matches_scipy_with_mirrored_borders(he_tiles):
    blurred = GaussianBlur(sigma_px=1.5)(he_tiles)
    expected = per_channel(lambda c: ndi.gaussian_filter(c, 1.5, mode="mirror", truncate=4.0), he_tiles)
    np.testing.assert_allclose(blurred.numpy(), expected, atol=1e-6)
    median = MedianBlur(size_px=5)(he_tiles)
    np.testing.assert_array_equal(
        median.numpy(), per_channel(lambda c: ndi.median_filter(c, size=5, mode="mirror"), he_tiles)
    )
    assert torch.isclose(median, he_tiles).float().mean() < 0.5  # it did change the tiles


def test_cielab_conversions_match_scikit_image(he_tiles):
    x = he_tiles.double()
    x[0, :, 0, :4] = torch.tensor(
        [[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.5], [0.0, 1.0, 0.0, 1.0]]
    )  # black, white, red, azure
    expected = rgb2lab(x.permute(0, 2, 3, 1).numpy()).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(rgb_to_lab(x).numpy(), expected, atol=1e-8)
    back = lab2rgb(expected.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(lab_to_rgb(torch.from_numpy(expected)).numpy(), back, atol=1e-8)
    np.testing.assert_allclose(back, x.numpy(), atol=1e-8)


def test_reinhard_matches_the_target_moments_and_fits_a_tile_to_itself(he_tiles):
    own = Reinhard.fitted(he_tiles[:1])
    np.testing.assert_allclose(own(he_tiles[:1]).numpy(), he_tiles[:1].numpy(), atol=1e-4)
    # a target near the tile's own moments, so that no pixel leaves the sRGB gamut (clipped there)
    target_mean = own.target_mean.flatten() + torch.tensor([-2.0, 1.0, -1.0])
    target = Reinhard(target_mean=target_mean.tolist(), target_std=(own.target_std.flatten() * 0.9).tolist())
    normalised = rgb_to_lab(target(he_tiles[:1]).double())
    mean, std = normalised.mean(dim=(2, 3)).flatten(), normalised.std(dim=(2, 3)).flatten()
    np.testing.assert_allclose(mean.numpy(), target.target_mean.flatten().numpy(), atol=0.01)
    np.testing.assert_allclose(std.numpy(), target.target_std.flatten().numpy(), rtol=0.01)
    x = he_tiles[:2].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(target(x).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_jpeg_is_pils_round_trip_and_passes_the_gradient_straight_through(he_tiles):
    stored = torch.round(he_tiles * 255).to(torch.uint8)
    expected = np.stack([jpeg_round_trip(tile, quality=50) for tile in stored.permute(0, 2, 3, 1).numpy()])
    decoded = JPEG(quality=50)(stored.float() / 255)
    np.testing.assert_array_equal(torch.round(decoded * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy(), expected)
    errors = {q: (JPEG(quality=q)(he_tiles) - he_tiles).abs().mean() for q in (10, 50, 95)}
    assert errors[95] < errors[50] < errors[10]
    x = he_tiles.clone().requires_grad_(True)
    weights = torch.randn_like(x)
    (grad,) = torch.autograd.grad((JPEG(quality=50)(x) * weights).sum(), x)
    torch.testing.assert_close(grad, weights)  # BPDA: the identity's gradient
    assert not JPEG(quality=50, straight_through=False)(x).requires_grad  # no gradient at all without BPDA


def test_bit_depth_by_hand_and_its_masked_gradient():
    x = torch.tensor([0.0, 0.1, 0.2, 0.5, 0.6, 0.93, 1.0]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    expected = torch.tensor([0, 0, 1, 2, 2, 3, 3]) / 3  # 2 bits: levels k/3; 0.5*3 = 1.5 rounds to even
    torch.testing.assert_close(BitDepth(bits=2)(x)[0, 0, 0], expected)
    x = x.clone().requires_grad_(True)
    (straight,) = torch.autograd.grad(BitDepth(bits=2)(x).sum(), x)
    (exact,) = torch.autograd.grad(BitDepth(bits=2, straight_through=False)(x).sum(), x)
    assert (straight == 1).all() and (exact == 0).all()


def test_noise_draws_anew_repeats_per_seed_and_eot_averages_the_draws(he_tiles):
    first, second = GaussianNoise(sigma=0.05, seed=1), GaussianNoise(sigma=0.05, seed=1)
    a, b = first(he_tiles), first(he_tiles)
    assert not torch.equal(a, b)
    torch.testing.assert_close(second(he_tiles), a)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 4, bias=False)).eval().requires_grad_(False)
    defence = GaussianNoise(sigma=0.05, seed=2)
    draws = torch.stack([linear(defence(he_tiles)) for _ in range(4)]).mean(0)
    eot = DefendedEncoder(defence=GaussianNoise(sigma=0.05, seed=2), encoder=linear, eot_samples=4)
    torch.testing.assert_close(eot(he_tiles), draws)
    with pytest.raises(ValueError, match="deterministic"):
        DefendedEncoder(defence=BitDepth(bits=3), encoder=linear, eot_samples=4)
    # the adaptive attack's tiles are re-embedded by the pipeline: one draw, not the attacker's mean
    pipeline = pipeline_of(eot)
    assert pipeline.eot_samples == 1 and pipeline.encoder is linear and pipeline.defence is eot.defence
    one_draw = GaussianNoise(sigma=0.05, seed=2)
    torch.testing.assert_close(
        pipeline_of(DefendedEncoder(defence=one_draw, encoder=linear))(he_tiles),
        linear(GaussianNoise(sigma=0.05, seed=2)(he_tiles)),
    )
    assert pipeline_of(linear) is linear


def test_build_defence_from_config_entries():
    assert isinstance(build_defence({"kind": "jpeg", "quality": 75}), JPEG)
    assert build_defence({"kind": "bit_depth", "bits": 4}).levels == 15
    with pytest.raises(ValueError, match="unknown tile defence 'blur'"):
        build_defence({"kind": "blur"})
    with pytest.raises(ValueError, match="'median'.*radius"):
        build_defence({"kind": "median", "radius": 3})
    with pytest.raises(ValueError, match="odd"):
        build_defence({"kind": "median", "size_px": 4})


def attack_through(model, clean, *, eps=8 / 255, steps=20):
    """PGD (label-free cosine) against ``model``; the best iterate, rounded to grey levels."""
    method, objective = build_method({"method": "pgd", "eps": eps, "steps": steps})
    with torch.no_grad():
        reference = model(clean)
    outcome = method(
        encoder=model,
        clean=clean,
        reference=reference,
        generator=torch.Generator().manual_seed(0),
        objective=objective.fn,
    )
    return torch.round(outcome.adversarial * 255) / 255


@pytest.mark.parametrize(
    ("defence", "least_gain"),
    # least_gain: the toy's adaptive/non-adaptive ratio was 1.35 (bit depth), 3.2 (JPEG), 4.2
    # (median) and 5.5 (Gaussian) on this seed, 1.2-6.0 on encoder seeds 0-2; asserted with margin
    [(BitDepth(bits=3), 1.2), (JPEG(quality=50), 2.0), (MedianBlur(size_px=3), 2.0), (GaussianBlur(sigma_px=1.0), 2.0)],
    ids=["bit_depth", "jpeg", "median", "gaussian"],
)
def test_the_adaptive_attack_beats_the_non_adaptive_one_through_the_defence(tiny, he_tiles, defence, least_gain):
    defended = DefendedEncoder(defence=defence, encoder=tiny)
    with torch.no_grad():
        reference = defended(he_tiles)
        non_adaptive = cosine_distance(defended(attack_through(tiny, he_tiles)), reference).mean()
        adaptive = cosine_distance(defended(attack_through(defended, he_tiles)), reference).mean()
        undefended = cosine_distance(tiny(attack_through(tiny, he_tiles)), tiny(he_tiles)).mean()
    assert adaptive > least_gain * non_adaptive
    if not isinstance(defence, BitDepth):  # 3-bit rounding of the clean tile itself moves it further
        assert non_adaptive < 0.2 * undefended  # the defence does blunt the attack it was not shown


def test_bit_depth_masks_the_gradient_from_the_naive_attacker(tiny, he_tiles):
    masked = DefendedEncoder(defence=BitDepth(bits=3, straight_through=False), encoder=tiny)
    start = (he_tiles + 4 / 255).clamp(0, 1)
    problem = Problem(encoder=masked, clean=he_tiles, reference=masked(he_tiles), objective=cosine_distance, ball=None)
    with pytest.raises(AttackError, match="zero"):
        problem.value_and_grad(start)
    bpda = DefendedEncoder(defence=BitDepth(bits=3), encoder=tiny)
    problem = Problem(encoder=bpda, clean=he_tiles, reference=bpda(he_tiles), objective=cosine_distance, ball=None)
    _, grad = problem.value_and_grad(start)
    assert torch.isfinite(grad).all() and (grad != 0).float().mean() > 0.5


@pytest.fixture(scope="module")
def abmil():
    torch.manual_seed(0)
    return build_mil_model("abmil", in_dim=8, n_classes=2).eval().requires_grad_(False)


def test_drop_top_attended_predicts_the_bag_without_its_most_attended_tiles(abmil):
    bag = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
    logits, weights = abmil(bag)
    torch.testing.assert_close(DropTopAttended(abmil, fraction=0.0)(bag)[0], logits)
    defended_logits, defended_weights = DropTopAttended(abmil, fraction=0.1)(bag)
    top = torch.argsort(weights, descending=True)[:2]
    keep = torch.sort(torch.argsort(weights, descending=True)[2:]).values
    torch.testing.assert_close(defended_logits, abmil(bag[keep])[0])
    assert (defended_weights[top] == 0).all() and torch.isclose(defended_weights.sum(), torch.tensor(1.0))
    assert DropTopAttended(abmil, fraction=0.99)(bag)[1].count_nonzero() == 1  # never the whole bag
    bag = bag.clone().requires_grad_(True)  # the adaptive gray-box attacker's gradient: the kept rows only
    (grad,) = torch.autograd.grad(DropTopAttended(abmil, fraction=0.1)(bag)[0][1], bag)
    assert (grad[top] == 0).all() and grad[keep].abs().sum() > 0


@pytest.mark.parametrize("kind", ["drop_top_attended", "knn_filter"])
def test_drop_evasion_gives_a_dropped_tile_a_gradient_and_spares_a_kept_one(abmil, kind):
    """A perturbed tile that a head defence drops has no gradient through the defended head; the
    evasion penalty gives it one (towards a lower score), and is zero for a tile below the drop line."""
    bag = clustered_bag(n=20, outliers=[3])
    if kind == "drop_top_attended":
        defended = DropTopAttended(abmil, fraction=0.1)
    else:
        defended = FilteredHead(abmil, fraction=0.1, k=5)
    scores = defended.evasion_scores(bag)
    order = torch.argsort(scores, descending=True)  # 2 of 20 dropped
    target = torch.tensor([1])

    for row, dropped in ((order[0], True), (order[-1], False)):
        rows = row.reshape(1)

        def plain(embedding, _clean, rows=rows):
            logits, _ = defended(bag.index_put((rows,), embedding))
            return torch.nn.functional.cross_entropy(logits[None], target).expand(len(embedding))

        evading = drop_evasion(plain, defended=defended, bag=bag, rows=rows, weight=2.0)
        embedding = bag[rows].clone().requires_grad_(True)
        (plain_grad,) = torch.autograd.grad(plain(embedding, bag[rows]).sum(), embedding)
        value = evading(embedding, bag[rows])
        (grad,) = torch.autograd.grad(value.sum(), embedding)
        assert bool((plain_grad == 0).all()) == dropped
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        if dropped:  # by hand: 2 x (its score - the 2nd highest score of the other rows)
            expected = 2.0 * (scores[row] - scores[order[2]])
            torch.testing.assert_close(plain(embedding, bag[rows]) - value, expected.reshape(1), rtol=1e-5, atol=1e-6)
            stepped = embedding + 0.05 * grad.sign()  # ascending the evading objective lowers the score
            assert defended.evasion_scores(bag.index_put((rows,), stepped.detach()))[row] < scores[row]
        else:
            torch.testing.assert_close(value, plain(embedding, bag[rows]))


def clustered_bag(*, n=40, outliers=(), seed=0):
    """Tiles around two tissue prototypes; ``outliers`` rows pushed far from both."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(2, 8, generator=g)
    bag = prototypes[torch.arange(n) % 2] + 0.05 * torch.randn(n, 8, generator=g)
    for row in outliers:
        bag[row] = torch.randn(8, generator=g) * 3
    return bag


def test_knn_scores_against_brute_force_and_the_filter_drops_the_outlier(abmil):
    bag = clustered_bag(outliers=[7])
    unit = (bag / bag.norm(dim=1, keepdim=True)).numpy().astype(np.float64)
    distance = 1 - unit @ unit.T
    np.fill_diagonal(distance, np.inf)
    expected = np.sort(distance, axis=1)[:, :5].mean(axis=1)
    scores = knn_outlier_scores(bag, k=5, chunk_rows=7)  # chunks that do not divide N
    np.testing.assert_allclose(scores.numpy(), expected, atol=1e-5)
    assert int(scores.argmax()) == 7
    assert knn_outlier_scores(bag[:1], k=5).tolist() == [0.0]
    logits, weights = FilteredHead(abmil, fraction=0.05, k=5)(bag)  # 2 of 40 dropped
    assert weights[7] == 0 and (weights > 0).sum() == 38
    torch.testing.assert_close(logits, abmil(bag[torch.argsort(scores, descending=True)[2:].sort().values])[0])
    rows = torch.arange(40) != 7
    np.testing.assert_allclose(
        scores_against(bag[7:8], reference=bag[rows], k=5).numpy(), scores[7:8].numpy(), atol=1e-5
    )
    detection = slide_detection(bag.numpy(), index=np.array([7]), fraction=0.05, k=5)
    assert detection == {"detected": 1, "detection_auroc": 1.0}
    assert slide_detection(bag.numpy(), index=np.array([8]), fraction=0.05, k=5)["detected"] == 0


def test_threshold_and_roc_by_hand():
    clean = np.array([0.0, 1.0, 2.0, 3.0])
    assert threshold_at_fpr(clean, fpr=0.25) == 3.0  # flags none of the clean tiles (> 3)
    assert threshold_at_fpr(np.arange(100.0), fpr=0.05) == 95.0  # flags 4 of 100
    roc = detector_roc(clean_scores=clean, attacked_scores=np.array([2.5, 3.0]), threshold=2.0)
    assert roc == {"auroc": (3 + 3.5) / 8, "tpr": 1.0, "fpr": 0.25}
    with pytest.raises(ValueError, match="fpr"):
        threshold_at_fpr(clean, fpr=0.0)


def test_the_detection_aware_attacker_evades_the_detector_the_plain_one_trips():
    """Embedding-space toy: the attacker moves one tile's embedding to be far from its clean
    self; the aware one stays under the detector's threshold while still moving it."""
    bag = clustered_bag(seed=3)
    row, others = 0, torch.arange(1, 40)
    threshold = threshold_at_fpr(knn_outlier_scores(bag, k=5).numpy(), fpr=0.05)
    clean = bag[row : row + 1]

    def ascend(objective):
        z = (clean + 0.01 * torch.randn(1, 8, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
        for _ in range(200):
            (grad,) = torch.autograd.grad(objective(z, clean).sum(), z)
            z = (z + 0.02 * grad.sign()).clamp(clean - 1.0, clean + 1.0).detach().requires_grad_(True)
        return z.detach()

    plain = ascend(cosine_distance)
    aware = ascend(detection_aware(cosine_distance, reference=bag[others], k=5, threshold=threshold, weight=10.0))
    score = lambda z: float(scores_against(z, reference=bag[others], k=5))  # noqa: E731
    assert score(plain) > threshold >= score(aware) - 1e-3
    start = clean + 0.01 * torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
    assert float(cosine_distance(aware, clean)) > 10 * float(cosine_distance(start, clean))  # it still moved


BASE = {
    "samples": "s.csv",
    "classes": ["normal", "tumor"],
    "encoders": ["demo"],
    "attacks": {
        "pgd": {"method": "pgd", "eps": "4/255"},
        "oracle": {"method": "pgd", "eps": "16/255", "objective": "mil_cross_entropy"},
    },
}


def test_defences_config_fills_defaults_and_names_the_culprit():
    from wsiattack import config as wsiconfig
    from wsiattack.defences.params import defence_pairs
    from wsiattack.errors import ConfigError

    block = {"defences": {"jpeg": {"kind": "jpeg"}, "drop": {"kind": "drop_top_attended"}, "noisy": {"kind": "noise"}}}
    config = wsiconfig.validate_config({**BASE, "defences": {**block, "attacks": ["pgd", "oracle"]}})
    defences = config["defences"]["defences"]
    assert defences["jpeg"] == {"kind": "jpeg", "quality": 75, "eot_samples": 1}
    assert defences["noisy"]["eot_samples"] == 8 and defences["drop"]["fraction"] == 0.05
    pairs = defence_pairs(config["defences"], attacks=config["attacks"])
    assert ("drop", "pgd") not in pairs and ("drop", "oracle") in pairs and ("jpeg", "pgd") in pairs
    cases = [
        ({"defences": {"x": {"kind": "blur"}}, "attacks": ["pgd"]}, "defences.defences.x.kind: 'blur'"),
        (
            {"defences": {"x": {"kind": "jpeg", "bits": 3}}, "attacks": ["pgd"]},
            r"\['bits'\] are not parameters of jpeg",
        ),
        ({"defences": {"x": {"kind": "median", "size_px": 4}}, "attacks": ["pgd"]}, "out of range"),
        ({"defences": {"x": {"kind": "reinhard"}}, "attacks": ["pgd"]}, "reinhard needs target_mean, target_std"),
        ({"defences": {"x": {"kind": "jpeg"}}, "attacks": ["pgd2"]}, "'pgd2' is not an attack"),
        ({"defences": {"x": {"kind": "drop_top_attended"}}, "attacks": ["pgd"]}, "needs a gray-box attack"),
        ({"defences": {"x": {"kind": "jpeg", "quality": "high"}}, "attacks": ["pgd"]}, "quality"),
        ({"defences": {"x": {"kind": "jpeg"}}, "attacks": ["pgd"], "eot": 3}, "eot"),
    ]
    for block, message in cases:
        with pytest.raises(ConfigError, match=message):
            wsiconfig.validate_config({**BASE, "defences": block})


def eval_table(*, slides, labels, probs_clean, probs_attacked, shift=0.1):
    """A per-slide evaluation table as evaluate writes it (two classes)."""
    rows = []
    for slide, label, clean, attacked in zip(slides, labels, probs_clean, probs_attacked, strict=True):
        rows.append(
            {
                "slide_id": slide,
                "label": ["normal", "tumor"][label],
                "label_idx": label,
                "k": 1,
                "clean_prob_normal": 1 - clean,
                "clean_prob_tumor": clean,
                "clean_pred": int(clean > 0.5),
                "attacked_prob_normal": 1 - attacked,
                "attacked_prob_tumor": attacked,
                "attacked_pred": int(attacked > 0.5),
                "tile_cosine_distance": shift,
            }
        )
    return pd.DataFrame(rows)


def test_defence_table_by_hand():
    """Eight slides: the attack flips four undefended; the defence costs one clean slide, the
    non-adaptive attack then flips none, the adaptive one two."""
    from wsiattack.defencetable import defence_rows

    slides, labels = [f"s{i}" for i in range(8)], [0, 1] * 4
    right = [0.2 if y == 0 else 0.8 for y in labels]
    wrong = [1 - p for p in right]
    undefended = eval_table(slides=slides, labels=labels, probs_clean=right, probs_attacked=wrong[:4] + right[4:])
    defended_clean = [wrong[0], *right[1:]]
    nonadaptive = eval_table(
        slides=slides, labels=labels, probs_clean=defended_clean, probs_attacked=defended_clean, shift=0.02
    )
    adaptive = eval_table(
        slides=slides,
        labels=labels,
        probs_clean=defended_clean,
        probs_attacked=[wrong[0], *wrong[1:3], *right[3:]],
        shift=0.05,
    )
    nonadaptive["detected"], nonadaptive["detection_auroc"] = [1, 0, 0, 0, 0, 0, 0, 1], 0.75
    adaptive["detected"], adaptive["detection_auroc"] = 0, 0.5

    def table(undefended, nonadaptive, adaptive, *, kind="median", n_bootstrap=0):
        return defence_rows(
            undefended=undefended,
            nonadaptive=nonadaptive,
            adaptive=adaptive,
            kind=kind,
            classes=["normal", "tumor"],
            n_bootstrap=n_bootstrap,
            seed=0,
        ).set_index("metric")

    rows = table(undefended, nonadaptive, adaptive, n_bootstrap=200)
    accuracy = rows.loc["accuracy"]
    assert accuracy["clean"] == 1.0 and accuracy["clean_defended"] == 7 / 8 and accuracy["clean_cost"] == 1 / 8
    assert (
        accuracy["attacked"] == 0.5
        and accuracy["attacked_nonadaptive"] == 7 / 8
        and accuracy["attacked_adaptive"] == 5 / 8
    )
    assert accuracy["nonadaptive_gain"] == pytest.approx(3 / 8) and accuracy["adaptive_gain"] == pytest.approx(1 / 8)
    assert accuracy["nonadaptive_gain_ci_low"] <= 3 / 8 <= accuracy["nonadaptive_gain_ci_high"]
    assert not accuracy["red_flag"]  # the adaptive attack did hurt more
    flips = rows.loc["flip_rate"]
    assert flips["attacked"] == 0.5 and flips["attacked_nonadaptive"] == 0 and flips["attacked_adaptive"] == 2 / 8
    assert flips["nonadaptive_gain"] == 0.5 and flips["adaptive_gain"] == 0.25
    assert flips["clean_cost"] == 1 / 8  # the defence changes one clean prediction of eight
    p_true = rows.loc["p_true_class"]  # 0.8 right, 0.2 wrong
    assert p_true["clean"] == pytest.approx(0.8) and p_true["clean_cost"] == pytest.approx(0.6 / 8)
    assert p_true["attacked"] == pytest.approx(0.5) and p_true["attacked_adaptive"] == pytest.approx(0.8 - 3 * 0.6 / 8)
    assert p_true["nonadaptive_gain"] == pytest.approx(0.8 - 0.6 / 8 - 0.5)
    assert p_true["adaptive_gain_ci_low"] <= p_true["adaptive_gain"] <= p_true["adaptive_gain_ci_high"]
    shift = rows.loc["tile_cosine_distance"]  # 0.1 undefended, 0.02 and 0.05 defended: both gains positive
    assert shift["nonadaptive_gain"] == pytest.approx(0.08) and shift["adaptive_gain"] == pytest.approx(0.05)
    assert np.isnan(shift["clean_cost"]) and not rows["red_flag"].any()
    assert rows["attack_moved"].all()  # 4 of 8 slides flipped, every interval excludes 0
    assert accuracy["detected_nonadaptive"] == 2 / 8 and accuracy["detection_auroc_adaptive"] == 0.5
    swapped = table(undefended, adaptive, nonadaptive)
    assert swapped.loc[["accuracy", "flip_rate", "p_true_class", "tile_cosine_distance"], "red_flag"].all()
    # an attack that flips nothing cannot tell the attackers apart on accuracy
    unmoved = table(
        eval_table(slides=slides, labels=labels, probs_clean=right, probs_attacked=right), nonadaptive, nonadaptive
    )
    assert not unmoved.loc[["accuracy", "flip_rate", "p_true_class"], ["attack_moved", "red_flag"]].any().any()
    assert unmoved.loc["tile_cosine_distance", "red_flag"]
    jpeg = table(undefended, adaptive, nonadaptive, kind="jpeg")
    assert not jpeg["red_flag"].any()  # BPDA: no exact gradient, no red flag by this rule
