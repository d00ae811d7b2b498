"""The defences' vocabulary and config checks (torch-free: config validation imports it).

A defence entry is ``{kind: ..., <parameters>}``; its parameters and their defaults are
``DEFENCE_PARAMS`` (a parameter of another kind is an error). Tile defences transform the tiles
before the encoder (``transforms``); head defences change how the MIL head aggregates the bag
(``aggregation``). The adaptive attacker's settings (``eot_samples``, ``detection_weight``) are
the block's and are copied into every entry.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from wsiattack.attacks.params import is_derived, uses_mil_head
from wsiattack.errors import ConfigError

DEFENCE_PARAMS: dict[str, dict[str, Any]] = {
    "jpeg": {"quality": 75},
    "bit_depth": {"bits": 4},
    "gaussian": {"sigma_px": 1.0},
    "median": {"size_px": 3},
    "reinhard": {"target_mean": None, "target_std": None},
    "noise": {"sigma": 0.02, "seed": 0},
    "drop_top_attended": {"fraction": 0.05},
    "knn_filter": {"fraction": 0.01, "k": 10},
}
TILE_DEFENCES = frozenset({"jpeg", "bit_depth", "gaussian", "median", "reinhard", "noise"})
HEAD_DEFENCES = frozenset({"drop_top_attended", "knn_filter"})
RANDOMISED_DEFENCES = frozenset({"noise"})
# where the adaptive attacker has the exact gradient of the same function: if it does no better than
# the non-adaptive attack, suspect the attack (a red flag in the defences table)
EXACT_GRADIENT_DEFENCES = frozenset({"gaussian", "median", "reinhard"})
MODES = ("nonadaptive", "adaptive")
ATTACKER_KEYS = ("eot_samples", "detection_weight")  # settings of the adaptive attacker, not of the defence


def normalise_defences(block: dict[str, Any], *, attacks: Mapping[str, Mapping[str, Any]]) -> None:
    """Fill each defence's defaults (in place), check its parameters and the listed attacks."""
    for name, entry in block["defences"].items():
        block["defences"][name] = _checked_entry(name, entry, block=block)
    for attack in block["attacks"]:
        if attack not in attacks:
            raise ConfigError(f"config: defences.attacks: {attack!r} is not an attack under attacks")
        if is_derived(attacks[attack]):
            raise ConfigError(
                f"config: defences.attacks: {attack!r} is derived (transfer, shuffled or universal); list attacks crafted on the evaluated encoder"
            )
    for name in block["defences"]:
        if not defence_pairs(block, attacks=attacks, defence=name):
            raise ConfigError(
                f"config: defences.defences.{name}: no listed attack can be run adaptively against it (drop_top_attended needs a gray-box attack: selection attention or objective mil_cross_entropy)"
            )


def _checked_entry(name: str, entry: Mapping[str, Any], *, block: Mapping[str, Any]) -> dict[str, Any]:
    where = f"config: defences.defences.{name}"
    kind = entry.get("kind")
    if kind not in DEFENCE_PARAMS:
        raise ConfigError(f"{where}.kind: {kind!r} is not one of {', '.join(DEFENCE_PARAMS)}")
    unknown = sorted(set(entry) - {"kind", *DEFENCE_PARAMS[kind]})
    if unknown:
        raise ConfigError(
            f"{where}: {unknown} are not parameters of {kind} (allowed: {', '.join(DEFENCE_PARAMS[kind])})"
        )
    checked = {"kind": kind, **copy.deepcopy(DEFENCE_PARAMS[kind]), **copy.deepcopy(dict(entry))}
    missing = [key for key, value in checked.items() if value is None]
    if missing:
        raise ConfigError(f"{where}: {kind} needs {', '.join(missing)}")
    _check_ranges(checked, where=where)
    checked["eot_samples"] = block["eot_samples"] if kind in RANDOMISED_DEFENCES else 1
    if kind in HEAD_DEFENCES:  # the weight of the adaptive attacker's penalty on being dropped
        checked["detection_weight"] = block["detection_weight"]
    return checked


def _check_ranges(entry: Mapping[str, Any], *, where: str) -> None:
    kind = entry["kind"]
    bad = {
        "jpeg": not 1 <= entry.get("quality", 1) <= 95,
        "bit_depth": not 1 <= entry.get("bits", 1) <= 7,
        "gaussian": not entry.get("sigma_px", 1) > 0,
        "median": not (entry.get("size_px", 3) >= 3 and entry.get("size_px", 3) % 2 == 1),
        "reinhard": kind == "reinhard"
        and (len(entry["target_mean"]) != 3 or len(entry["target_std"]) != 3 or min(entry["target_std"]) <= 0),
        "noise": not entry.get("sigma", 1) > 0,
        "drop_top_attended": not 0 < entry.get("fraction", 0.5) < 1,
        "knn_filter": not (0 < entry.get("fraction", 0.5) < 1 and entry.get("k", 1) >= 1),
    }[kind]
    if bad:
        params = {key: value for key, value in entry.items() if key != "kind"}
        raise ConfigError(
            f"{where}: {kind} parameters out of range: {params} (jpeg quality 1-95, bits 1-7, sigma > 0, odd size_px >= 3, 3 target values with std > 0, fraction in (0, 1), k >= 1)"
        )


def defence_pairs(
    block: Mapping[str, Any], *, attacks: Mapping[str, Mapping[str, Any]], defence: str | None = None
) -> list[tuple[str, str]]:
    """The (defence, attack) pairs evaluated, both ways. A head defence that needs the head to be
    attacked adaptively (drop_top_attended) pairs with gray-box attacks only."""
    names: Sequence[str] = [defence] if defence else list(block["defences"])
    return [
        (name, attack)
        for name in names
        for attack in block["attacks"]
        if block["defences"][name]["kind"] != "drop_top_attended" or uses_mil_head(attacks[attack])
    ]


def is_tile_defence(entry: Mapping[str, Any]) -> bool:
    return entry["kind"] in TILE_DEFENCES
