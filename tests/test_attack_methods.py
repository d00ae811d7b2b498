"""Attack methods: analytic optimum on a rank-1 linear encoder, invariants on the demo encoder,
shared guards, and a cross-check against torchattacks (skipped when it is not installed)."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from wsiattack.attacks.methods import APGD, FGSM, MIFGSM, PGD, CarliniWagnerL2, UniformNoise, build_method
from wsiattack.attacks.objectives import cosine_distance, l2_distance
from wsiattack.encoders.embedding import channels_first, to_unit_pixels
from wsiattack.encoders.model import build_encoder
from wsiattack.errors import AttackError
from wsiattack.synthetic import render_slide

EPS = 4 / 255


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- analytic oracle: f(x) = w·x, objective |w·(x' − x)| ------------------------------------------


class RankOne(nn.Module):
    """f(x) = w·x: the l2 objective is |w·δ|, maximised over the L-inf box at δ = ±eps·sign(w)
    (value eps·‖w‖₁) and over the L2 ball at δ = ±radius·w/‖w‖₂ (value radius·‖w‖₂)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, x):
        return (x * self.w).flatten(1).sum(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def oracle():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 8, 8, generator=g)
    clean = 0.3 + 0.4 * torch.rand(4, 3, 8, 8, generator=g)  # far from 0 and 1: no clipping
    encoder = RankOne(w).eval()
    return encoder, clean, encoder(clean)


def attack(method, encoder, clean, reference, *, objective=l2_distance, seed=0):
    return method(
        encoder=encoder,
        clean=clean,
        reference=reference,
        generator=torch.Generator().manual_seed(seed),
        objective=objective,
    )


@pytest.mark.parametrize(
    "method",
    [FGSM(eps=EPS), PGD(eps=EPS, steps=10, step_size=EPS / 4), MIFGSM(eps=EPS, steps=10, step_size=EPS / 4)],
    ids=["fgsm", "pgd", "mifgsm"],
)
def test_fgsm_pgd_mifgsm_reach_the_linf_optimum_exactly(oracle, method):
    encoder, clean, reference = oracle
    out = attack(method, encoder, clean, reference)
    delta = out.adversarial - clean
    sign = torch.sign((delta * encoder.w).flatten(1).sum(1)).view(-1, 1, 1, 1)  # either vertex is optimal
    torch.testing.assert_close(delta, sign * EPS * torch.sign(encoder.w).expand_as(delta), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.objective, torch.full((4,), EPS * encoder.w.abs().sum().item()), rtol=1e-5, atol=0)


def test_apgd_comes_within_a_small_margin_of_the_linf_optimum(oracle):
    encoder, clean, reference = oracle
    out = attack(APGD(eps=EPS, steps=20), encoder, clean, reference)
    optimum = EPS * encoder.w.abs().sum().item()
    assert torch.all(out.objective >= 0.999 * optimum) and torch.all(out.objective <= optimum * (1 + 1e-5))


@pytest.mark.parametrize(
    "method",
    [
        FGSM(eps=EPS, norm="l2"),
        PGD(eps=EPS, norm="l2", steps=30, step_size=EPS / 2),
        CarliniWagnerL2(eps=EPS, steps=100, binary_search_steps=2, lr=0.02),
    ],
    ids=["fgsm", "pgd", "cw"],
)
def test_l2_methods_reach_the_l2_optimum(oracle, method):
    encoder, clean, reference = oracle
    out = attack(method, encoder, clean, reference)
    radius = EPS * math.sqrt(clean[0].numel())
    optimum = radius * encoder.w.norm().item()
    margin = 1e-5 if isinstance(method, FGSM) else 0.01
    assert torch.all(out.objective >= (1 - margin) * optimum), out.objective / optimum
    assert torch.all((out.adversarial - clean).flatten(1).norm(dim=1) <= radius * (1 + 1e-6))


def test_cw_with_a_reachable_kappa_stops_near_it_with_less_distortion(oracle):
    """Success = objective >= kappa: the binary search then trades objective for distortion."""
    encoder, clean, reference = oracle
    radius = EPS * math.sqrt(clean[0].numel())
    kappa = 0.5 * radius * encoder.w.norm().item()
    out = attack(
        CarliniWagnerL2(eps=EPS, steps=100, binary_search_steps=4, lr=0.02, kappa=kappa), encoder, clean, reference
    )
    distortion = (out.adversarial - clean).flatten(1).norm(dim=1)
    assert torch.all(out.objective >= kappa)
    assert torch.all(distortion < 0.8 * radius)  # the least-distortion success, not the full budget


def test_cw_rounds_go_on_from_the_best_iterate_and_are_counted(oracle):
    """kappa null: success is unreachable, so each round must add to the last (restarting from
    the same point made every round repeat the first), and its evaluations are counted."""
    encoder, clean, reference = oracle
    optimum = EPS * math.sqrt(clean[0].numel()) * encoder.w.norm().item()
    one = attack(CarliniWagnerL2(eps=EPS, steps=2, binary_search_steps=1, lr=0.01), encoder, clean, reference)
    three = attack(CarliniWagnerL2(eps=EPS, steps=2, binary_search_steps=3, lr=0.01), encoder, clean, reference)
    assert torch.all(one.objective < 0.3 * optimum) and torch.all(
        three.objective > 0.7 * optimum
    )  # 0.24-0.28 vs 0.72-0.76
    assert torch.all(one.iterations == 1 + 2) and torch.all(three.iterations == 1 + 3 * 2)  # + the scale probe


# --- invariants: H&E-like tiles, the demo encoder (vs. noise) and a small CNN (the rest) ----------


@pytest.fixture(scope="module")
def demo():
    return build_encoder("demo")


@pytest.fixture(scope="module")
def tissue_uint8():
    """The two most tissue-covered 224 px tiles of a synthetic H&E-like slide with tumour."""
    image = render_slide(rng=np.random.default_rng(3), width_px=896, height_px=896, tumor=True, tumor_share=0.3)
    tiles = image.reshape(4, 224, 4, 224, 3).swapaxes(1, 2).reshape(16, 224, 224, 3)
    return tiles[np.argsort(tiles.reshape(16, -1).mean(axis=1))[:2]]


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


@pytest.fixture(scope="module")
def crops_uint8(tissue_uint8):
    """Four 64 px crops of the tissue tiles, for the many runs of the small CNN."""
    return np.concatenate([tissue_uint8[:, :64, :64], tissue_uint8[:, 100:164, 100:164]])


FAST = {  # few steps: on the demo encoder every gradient step costs a ViT forward + backward
    "fgsm": {},
    "pgd": {"steps": 2, "step_size": 2 / 255},
    "pgd_l2": {"method": "pgd", "norm": "l2", "steps": 2, "step_size": 2 / 255},
    "mifgsm": {"steps": 2, "step_size": 2 / 255},
    "apgd": {"steps": 3},
    "cw": {"steps": 2, "binary_search_steps": 1, "lr": 0.05},
}
LONGER = {
    "pgd": {"steps": 5},
    "pgd_l2": {"steps": 5},
    "mifgsm": {"steps": 5},
    "apgd": {"steps": 12},
    "cw": {"steps": 6, "binary_search_steps": 2},
}


def run_rounded(encoder, tiles_uint8, name, *, eps=EPS, seed=0, **overrides):
    """Attack, round to uint8 as perturb does; return (uint8 tiles, objective after rounding, outcome, method)."""
    spec = {"method": name, **FAST.get(name, {}), "eps": eps, "objective": "cosine", **overrides}
    method, objective = build_method(spec)
    clean = to_unit_pixels(tiles_uint8)
    with torch.no_grad():
        reference = encoder(clean)
    out = attack(method, encoder, clean, reference, objective=objective.fn, seed=seed)
    adv = method.ball.quantize(out.adversarial, channels_first(tiles_uint8))
    with torch.no_grad():
        after = objective.fn(encoder(adv.float() / 255), reference)
    return adv, after, out, method


def assert_within_bound(adv, tiles_uint8, method, out):
    delta = adv.int() - channels_first(tiles_uint8).int()
    if method.ball.norm == "linf":
        assert delta.abs().max() <= round(method.eps * 255)
    else:
        assert torch.all(delta.flatten(1).float().norm(dim=1) / 255 <= method.ball.radius(out.adversarial) * (1 + 1e-6))
    assert out.adversarial.min() >= 0 and out.adversarial.max() <= 1


def test_every_method_beats_the_noise_control_on_the_demo_encoder_within_its_bound(demo, tissue_uint8):
    noise = run_rounded(demo, tissue_uint8, "noise")[1]
    for name in FAST:
        adv, after, out, method = run_rounded(demo, tissue_uint8, name)
        assert_within_bound(adv, tissue_uint8, method, out)
        assert torch.all(after > noise), (name, after, noise)
    assert not demo.training


@pytest.mark.parametrize("name", list(FAST))
def test_bound_after_rounding_and_same_seed_same_bytes(tiny, crops_uint8, name):
    adv, _, out, method = run_rounded(tiny, crops_uint8, name)
    assert_within_bound(adv, crops_uint8, method, out)
    assert torch.all(out.iterations >= 1)
    assert torch.equal(adv, run_rounded(tiny, crops_uint8, name)[0])
    assert not torch.equal(adv, run_rounded(tiny, crops_uint8, name, seed=1)[0])


@pytest.mark.parametrize("name", list(LONGER))
def test_more_steps_never_lower_the_best_objective(tiny, crops_uint8, name):
    """PGD/MI-FGSM/C&W (kappa null): the short run is a prefix of the long one (same step size and
    start), so this holds by construction; APGD's schedule depends on N, so there it is empirical."""
    short = run_rounded(tiny, crops_uint8, name)[2].objective
    long = run_rounded(tiny, crops_uint8, name, **LONGER[name])[2].objective
    assert torch.all(long >= short - 1e-6), (short, long)


@pytest.mark.parametrize("name", [*FAST, "noise"])
def test_larger_eps_never_lowers_the_best_objective(tiny, crops_uint8, name):
    values = [
        run_rounded(tiny, crops_uint8, name, eps=eps, **LONGER.get(name, {}))[1]
        for eps in (1 / 255, 2 / 255, 4 / 255, 8 / 255)
    ]
    for small, large in itertools.pairwise(values):
        assert torch.all(large >= small), (name, values)


def test_noise_is_exactly_plus_or_minus_eps_where_not_clipped(tiny, crops_uint8):
    adv = run_rounded(tiny, crops_uint8, "noise")[0].int() - channels_first(crops_uint8).int()
    clean = channels_first(crops_uint8).int()
    inside = (clean >= 4) & (clean <= 251)
    assert set(adv[inside].unique().tolist()) == {-4, 4}


# --- guards shared by all methods ----------------------------------------------------------------


class Recorder(nn.Module):
    """Small conv encoder that records its mode and the dtype it computed in."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.seen = []

    def forward(self, x):
        out = self.conv(x)
        self.seen.append((self.training, out.dtype, torch.is_grad_enabled()))
        return out.flatten(2).mean(dim=2)


@pytest.mark.parametrize(
    "method",
    [
        FGSM(eps=EPS),
        PGD(eps=EPS, steps=2, step_size=1 / 255),
        MIFGSM(eps=EPS, steps=2, step_size=1 / 255),
        APGD(eps=EPS, steps=3),
        CarliniWagnerL2(eps=EPS, steps=2, binary_search_steps=1),
        UniformNoise(eps=EPS),
    ],
    ids=lambda m: type(m).__name__,
)
@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "autocast"])
def test_guards_eval_mode_gradients_fp32_and_mode_restored(method, context):
    torch.manual_seed(0)
    encoder = Recorder().train()
    outer = {
        "no_grad": torch.no_grad,
        "inference_mode": torch.inference_mode,
        "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    }[context]
    with outer():
        clean = torch.rand(2, 3, 16, 16)
        reference = encoder.eval()(clean).float()
        encoder.train().seen.clear()
        out = attack(method, encoder, clean, reference, objective=cosine_distance)
    assert encoder.training  # restored
    assert encoder.seen and all(not training and dtype == torch.float32 for training, dtype, _ in encoder.seen)
    if not isinstance(method, UniformNoise):
        assert any(grad for *_, grad in encoder.seen)
    assert torch.isfinite(out.objective).all()


class Constant(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :4] * 0 + 1.0


class _NaNBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class NaNGradient(nn.Module):
    """Finite outputs, NaN input gradient (what a broken fp16 backward looks like)."""

    def forward(self, x):
        return _NaNBackward.apply(x).flatten(1)[:, :4]


@pytest.mark.parametrize(
    "method",
    [
        FGSM(eps=EPS),
        PGD(eps=EPS, steps=2, step_size=1 / 255),
        MIFGSM(eps=EPS, steps=2, step_size=1 / 255),
        APGD(eps=EPS, steps=2),
        CarliniWagnerL2(eps=EPS, steps=2, binary_search_steps=1),
    ],
    ids=lambda m: type(m).__name__,
)
def test_zero_and_nan_gradients_are_errors_for_every_method(method):
    clean = torch.rand(2, 3, 8, 8)
    with pytest.raises(AttackError, match="all-zero input gradient for 2 tile"):
        attack(method, Constant(), clean, torch.ones(2, 4), objective=cosine_distance)
    with pytest.raises(AttackError, match="non-finite input gradient"):
        attack(method, NaNGradient(), clean, torch.ones(2, 4), objective=cosine_distance)


def test_an_oracle_objective_plugs_in_without_touching_the_methods():
    """The extension point: any (output, reference) -> (k,) callable, here cross-entropy on labels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).eval()
    clean, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    ce = lambda logits, y: F.cross_entropy(logits, y, reduction="none")  # noqa: E731
    before = ce(model(clean), labels)
    out = attack(PGD(eps=EPS, steps=5, step_size=1 / 255), model, clean, labels, objective=ce)
    assert torch.all(out.objective > before)


# --- cross-check against torchattacks -------------------------------------------------------------


def _small_classifier_and_data():
    """Linear 2-class model on 3×8×8 images, logit gap ∝ v·(x − 0.5) with v = ±1 per value.

    Each image is 0.5 + noise orthogonal to v + label sign · m · v, so an L-inf attack of eps can
    flip it exactly when m < eps; m ~ U(0, 2·eps) makes about half of them flippable.
    """
    g = torch.Generator().manual_seed(0)
    v = torch.randint(0, 2, (3, 8, 8), generator=g).float() * 2 - 1
    labels = torch.randint(0, 2, (400,), generator=g)
    noise = 0.05 * torch.randn(400, 3, 8, 8, generator=g)
    noise -= (noise * v).flatten(1).sum(1).view(-1, 1, 1, 1) * v / v.numel()
    margin = torch.rand(400, generator=g).view(-1, 1, 1, 1) * 2 * (8 / 255)
    images = 0.5 + noise + (labels * 2 - 1).float().view(-1, 1, 1, 1) * margin * v
    model = nn.Sequential(nn.Flatten(), nn.Linear(v.numel(), 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([-v.flatten(), v.flatten()]) * 0.1)
        model[1].bias.copy_(torch.tensor([0.05, -0.05]) * v.sum())
    return model.eval(), images, labels


def test_pgd_with_cross_entropy_matches_torchattacks_robust_accuracy():
    torchattacks = pytest.importorskip(
        "torchattacks", reason="torchattacks (test-only dependency, requirements-test.txt) is not installed"
    )
    model, images, labels = _small_classifier_and_data()
    eps, alpha, steps = 8 / 255, 2 / 255, 10
    clean_accuracy = (model(images).argmax(1) == labels).float().mean().item()
    ce = lambda logits, y: F.cross_entropy(logits, y, reduction="none")  # noqa: E731
    ours = attack(PGD(eps=eps, steps=steps, step_size=alpha), model, images, labels, objective=ce).adversarial
    torch.manual_seed(0)
    theirs = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)(images, labels)
    robust = [(model(x).argmax(1) == labels).float().mean().item() for x in (ours, theirs)]
    assert clean_accuracy == 1.0 and 0.3 < robust[1] < 0.7  # about half can be flipped: not vacuous
    assert abs(robust[0] - robust[1]) <= 0.03, robust
    assert (ours - images).abs().max() <= eps + 1e-6


@pytest.mark.parametrize("name", ["fgsm", "pgd", "mifgsm", "apgd", "cw", "noise"])
def test_a_method_built_bare_has_the_configs_defaults(name):
    """One source of defaults: a class built with eps alone equals the method the config builds."""
    from wsiattack.attacks.methods import METHODS
    from wsiattack.config import check_attack_entry

    entry = check_attack_entry({"method": name, "eps": "8/255"}, where="attacks.x")
    configured, _ = build_method(entry)
    assert METHODS[name](eps=8 / 255) == configured
