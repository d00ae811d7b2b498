"""The attack vocabulary (methods, norms, objectives, selections) and the methods' parameter
defaults, in one torch-free place (config validation uses it).

``normalise_attack`` fills a method's defaults into an attack entry and resolves a null
``step_size``, so the spec a rule carries states the exact parameters it ran with. Keys shared
by every method (``method, objective, eps, budget, selection, seed``) are the schema's business.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from wsiattack.errors import ConfigError

# None means "derived": step_size from eps and steps (STEP_SIZE_FACTOR), kappa = unreachable.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "fgsm": {"norm": "linf", "restarts": 1},
    "pgd": {"norm": "linf", "steps": 10, "step_size": None, "restarts": 1},
    "mifgsm": {"norm": "linf", "steps": 10, "step_size": None, "momentum": 1.0, "restarts": 1},
    "apgd": {"norm": "linf", "steps": 100, "momentum": 0.75, "rho": 0.75, "restarts": 1},
    "cw": {"steps": 100, "binary_search_steps": 5, "c": 10.0, "lr": 0.01, "kappa": None, "restarts": 1},
    "noise": {},
    "stain_pgd": {"steps": 10, "step_size": None, "restarts": 1},  # attacks.stain: eps is sigma
    "stain_jitter": {},
    "shuffled": {"source": None},  # attacks.shuffle: another attack's perturbation, spatially shuffled
    # attacks.universal: one pattern per (encoder, fold), learned on train_tiles tiles of each training slide
    "universal": {"steps": 100, "step_size": None, "train_tiles": 8, "batch_tiles": 16},
    # attacks.snap: eps is the masks' largest share of the tile's area; blob_um the blobs' diameter range
    "snap": {"steps": 100, "step_size": 0.01, "blobs": 12, "blob_um": [5.0, 12.0], "mask_source": "nuclei"},
    "snap_median": {"blobs": 12, "blob_um": [5.0, 12.0], "mask_source": "nuclei"},
    "snap_random": {"blobs": 12, "blob_um": [5.0, 12.0], "mask_source": "nuclei"},
}

# The ball of the methods without a `norm` parameter (C&W is L2 by construction; the noise
# control draws uniformly in the L-inf box; the stain methods bound stain concentrations).
FIXED_NORMS = {
    "cw": "l2",
    "noise": "linf",
    "stain_pgd": "stain",
    "stain_jitter": "stain",
    "shuffled": "shuffled",
    "universal": "linf",
    "snap": "mask",
    "snap_median": "mask",
    "snap_random": "mask",
}
STAIN_METHODS = frozenset({"stain_pgd", "stain_jitter"})
SNAP_METHODS = frozenset({"snap", "snap_median", "snap_random"})
# methods whose change is not a pixel-space ball, so the vulnerability probe (a signed step in one) does not apply
NON_BALL_METHODS = STAIN_METHODS | SNAP_METHODS


def attack_norm(entry: Mapping[str, Any]) -> str:
    """``linf``, ``l2``, ``stain`` or ``mask``: what an attack entry's ``eps`` bounds (``bounds.Ball``:
    L2 radius is eps·sqrt(C·H·W), so "eps 4/255" means a very different budget in the two norms;
    ``attacks.stain``: sigma of the stain concentrations' scale and shift; ``attacks.snap``: the
    masks' largest share of the tile's area)."""
    return entry.get("norm") or FIXED_NORMS.get(entry["method"], "linf")


# step_size = factor · eps / steps when not given. PGD: Madry et al.'s 2.5·eps/steps. MI-FGSM:
# Dong et al. use eps/steps from the clean tile; from a random start inside the ball the
# iterates may need to cross the whole diameter, hence 2·eps/steps.
# Universal: the same signed steps as PGD, on one pattern shared by minibatches of tiles.
STEP_SIZE_FACTOR = {"pgd": 2.5, "mifgsm": 2.0, "stain_pgd": 2.5, "universal": 2.5}

# The attack vocabulary. The config schema's enums of these keys are filled from here on load
# (schema.load_schema); numeric ranges of the parameters are the schema's alone.
NORMS = ("linf", "l2")
OBJECTIVES = ("cosine", "l2", "mil_cross_entropy")  # attacks.objectives implements each
SELECTIONS = ("random", "vulnerability", "centrality", "attention")
GRAY_BOX_SELECTIONS = frozenset({"attention"})  # selections that use the downstream model
MASK_SOURCES = ("nuclei", "ellipses")  # attacks.snap: where the blobs' shapes come from
ORACLE_OBJECTIVES = frozenset({"mil_cross_entropy"})  # objectives that use it (and the label)
# The attack's forward passes (runtime.attack_precision): exact float32 (default), TF32 matmuls,
# or the encoder's own autocast dtype as in clean extraction.
ATTACK_PRECISIONS = ("float32", "tf32", "encoder")

METHOD_PARAMS = frozenset(key for defaults in METHOD_DEFAULTS.values() for key in defaults)


def method_params(entry: Mapping[str, Any], *, where: str, strict: bool) -> dict[str, Any]:
    """The method's parameters with defaults filled and ``step_size`` resolved.

    ``strict`` refuses a non-null parameter of another method (``momentum`` on ``pgd``), which
    would otherwise be silently ignored; rules call this leniently because the config was
    checked when it was loaded.
    """
    method = entry.get("method")
    if method not in METHOD_DEFAULTS:
        raise ConfigError(f"config: {where}.method: unknown method {method!r} (known: {', '.join(METHOD_DEFAULTS)})")
    defaults = METHOD_DEFAULTS[method]
    if strict:
        _refuse_foreign(entry, method=method, where=where)
    # deep copies: a default list (snap's blob_um) must not be shared with every entry that uses it
    params = {
        key: copy.deepcopy(entry[key] if entry.get(key) is not None else value) for key, value in defaults.items()
    }
    if "step_size" in params and params["step_size"] is None:
        params["step_size"] = derived_step_size(method, eps=float(entry["eps"]), steps=params["steps"])
    return params


def derived_step_size(method: str, *, eps: float, steps: int) -> float:
    """The step size of ``method`` when none is given (the config's and the method classes' default)."""
    return STEP_SIZE_FACTOR[method] * eps / steps


def normalise_attack(entry: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """A validated attack entry with its method's parameters made explicit (strict)."""
    if entry["method"] != "noise" and float(entry["eps"]) == 0:
        raise ConfigError(
            f"config: {where}.eps: 0 is only meaningful for the noise method (the null control: the tiles unmodified); use a bound > 0"
        )
    if entry["method"] in NON_BALL_METHODS and entry.get("selection") == "vulnerability":
        raise ConfigError(
            f"config: {where}.selection: the vulnerability probe is a pixel-space gradient step and does not apply to method {entry['method']!r}; use random, centrality or attention"
        )
    if entry["method"] == "universal" and entry.get("selection", "random") != "random":
        raise ConfigError(
            f"config: {where}.selection: a universal perturbation is added without running an encoder, to randomly chosen tiles; use selection random"
        )
    if entry["method"] == "universal" and entry.get("objective") in ORACLE_OBJECTIVES:
        raise ConfigError(
            f"config: {where}.objective: a universal perturbation is learned label-free (cosine or l2), not with the MIL head"
        )
    if entry["method"] == "shuffled" and entry.get("precision") is not None:
        raise ConfigError(
            f"config: {where}.precision: a shuffled control is made from its source's stored tiles without running an encoder; remove it"
        )
    out = copy.deepcopy(dict(entry))
    out.update(method_params(entry, where=where, strict=True))
    return out


def uses_mil_head(entry: Mapping[str, Any]) -> bool:
    """Whether the attack needs a trained MIL head (and so its fold's checkpoint and splits)."""
    return entry.get("selection") in GRAY_BOX_SELECTIONS or entry.get("objective") in ORACLE_OBJECTIVES


def threat_marking(entry: Mapping[str, Any], *, encoder: str | None = None) -> dict[str, Any]:
    """The one definition of how an attack's outputs are marked (store attrs, eval CSV, summary).

    An attack that uses the downstream head (attention selection or an oracle objective) is not
    label-free and is gray-box; the label-free ones only need the encoder (white-box on it). An
    attack crafted on a ``surrogate`` and evaluated with another ``encoder`` is black-box
    (transfer); on the surrogate itself it is the white-box result.
    """
    label_free = not uses_mil_head(entry)
    surrogate = entry.get("surrogate") or ""
    if surrogate and encoder is not None and encoder != surrogate:
        threat = "black-box (transfer)"
    else:
        threat = "white-box" if label_free else "gray-box"
    return {"label_free": label_free, "threat_model": threat, "surrogate": surrogate}


def is_derived(entry: Mapping[str, Any]) -> bool:
    """Whether the attack's tiles are re-embedded by another job than the one that made them: a
    transfer attack (made once on its surrogate), a shuffled control (made from its source) or a
    universal perturbation (added to the tiles without an encoder)."""
    return bool(entry.get("surrogate")) or entry["method"] in ("shuffled", "universal")


# What a universal pattern depends on: editing an entry's budget re-applies its patterns, not re-learns them.
LEARNING_KEYS = (
    "method",
    "objective",
    "eps",
    "seed",
    "surrogate",
    "steps",
    "step_size",
    "train_tiles",
    "batch_tiles",
    "precision",
)


def learning_spec(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a universal attack entry that its patterns depend on (``LEARNING_KEYS``)."""
    return {key: copy.deepcopy(entry[key]) for key in LEARNING_KEYS if key in entry}


def resolve_mil(entry: dict[str, Any], *, mil_models: list[str], where: str) -> None:
    """Fill ``mil`` (default: the first of mil.models) for the attacks that use a head, check it."""
    if not uses_mil_head(entry):
        if entry.get("mil") is not None:
            raise ConfigError(
                f"config: {where}.mil: only attacks with selection 'attention' or objective 'mil_cross_entropy' use a MIL head; remove it"
            )
        entry.pop("mil", None)
        return
    if entry.get("objective") in ORACLE_OBJECTIVES and entry.get("selection") == "vulnerability":
        raise ConfigError(
            f"config: {where}.selection: the vulnerability probe scores tiles one by one and cannot use objective {entry['objective']!r}; use random, centrality or attention"
        )
    entry["mil"] = entry.get("mil") or mil_models[0]
    if entry["mil"] not in mil_models:
        raise ConfigError(f"config: {where}.mil: {entry['mil']!r} is not one of mil.models ({', '.join(mil_models)})")


def _refuse_foreign(entry: Mapping[str, Any], *, method: str, where: str) -> None:
    own = METHOD_DEFAULTS[method]
    foreign = sorted(key for key in METHOD_PARAMS - set(own) if entry.get(key) is not None)
    if foreign:
        allowed = ", ".join(own) or "none"
        raise ConfigError(
            f"config: {where}.{foreign[0]}: not a parameter of method {method!r} (its parameters: {allowed}); remove it"
        )
