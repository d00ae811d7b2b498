"""Transfer (black-box) attacks and shuffled controls in the config: the ``transfer`` block's
surrogate × target matrix expanded into attack entries, and the checks of every derived entry.

A transfer entry carries ``surrogate``: its tiles are perturbed once on that encoder and
re-embedded by every encoder under ``encoders`` (the targets), so the cost follows surrogates × k
tiles, not surrogates × targets × steps. A ``shuffled`` entry takes its ``source`` attack's stored
perturbation and shuffles it spatially (``attacks.shuffle``): Bortsova et al.'s control, the same
values with no structure. Torch-free (config validation).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from wsiattack.attacks.params import uses_mil_head
from wsiattack.errors import ConfigError


def transfer_name(attack: str, surrogate: str) -> str:
    return f"{attack}_from_{surrogate}"


def shuffled_name(attack: str) -> str:
    return f"{attack}_shuffled"


def expand_transfer(transfer: Mapping[str, Any], attacks: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The entries of the ``transfer`` block: per listed attack and surrogate, the attack crafted on
    the surrogate, and (``shuffled_control``) its shuffled control."""
    out: dict[str, dict[str, Any]] = {}
    for attack in transfer["attacks"]:
        if attack not in attacks:
            raise ConfigError(f"config: transfer.attacks: {attack!r} is not an attack under attacks")
        for surrogate in transfer["surrogates"]:
            name = transfer_name(attack, surrogate)
            out[name] = {**copy.deepcopy(attacks[attack]), "surrogate": surrogate}
            if transfer["shuffled_control"]:
                out[shuffled_name(name)] = shuffled_entry(out[name], source=name)
    return out


def shuffled_entry(source_entry: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """The shuffled control of ``source``: its eps and seed, and its surrogate if it has one."""
    entry = {"method": "shuffled", "source": source, "eps": source_entry["eps"], "seed": source_entry["seed"]}
    if source_entry.get("surrogate"):
        entry["surrogate"] = source_entry["surrogate"]
    return entry


def check_derived(attacks: dict[str, dict[str, Any]], *, wheres: Mapping[str, str], known_encoders: set[str]) -> None:
    """Transfer entries: a known surrogate, label-free. Shuffled entries: a source that exists and
    is not shuffled itself, the source's eps; its surrogate, budget, selection, objective and MIL
    model are the source's (filled in)."""
    for name, entry in attacks.items():
        where = wheres[name]
        surrogate = entry.get("surrogate")
        if surrogate is not None and surrogate not in known_encoders:
            raise ConfigError(
                f"config: {where}.surrogate: unknown encoder {surrogate!r} (known: {', '.join(sorted(known_encoders))})"
            )
        if entry["method"] == "shuffled":
            _check_shuffled(entry, attacks=attacks, where=where)
        elif surrogate is not None and uses_mil_head(entry):
            raise ConfigError(
                f"config: {where}.surrogate: a transfer attack is crafted without the target's MIL head; use a label-free objective and selection (not attention or mil_cross_entropy)"
            )


def _check_shuffled(entry: dict[str, Any], *, attacks: Mapping[str, Mapping[str, Any]], where: str) -> None:
    source = entry.get("source")
    if source is None:
        raise ConfigError(f"config: {where}.source: method 'shuffled' needs the attack whose perturbation it shuffles")
    if source not in attacks or attacks[source]["method"] == "shuffled":
        raise ConfigError(
            f"config: {where}.source: {source!r} is not an attack (other than a shuffled one) of this config"
        )
    origin = attacks[source]
    if abs(float(entry["eps"]) - float(origin["eps"])) > 1e-12:
        raise ConfigError(f"config: {where}.eps: must be the source's ({origin['eps']}), the bound it shuffles")
    if entry.get("surrogate", origin.get("surrogate")) != origin.get("surrogate"):
        raise ConfigError(f"config: {where}.surrogate: must be the source's ({origin.get('surrogate')})")
    if origin.get("surrogate"):
        entry["surrogate"] = origin["surrogate"]
    # Its tiles are the source's: so are its budget, selection and marking (a gray-box source's
    # tiles were chosen with the head).
    entry.update({key: copy.deepcopy(origin[key]) for key in INHERITED if key in origin})
    if "mil" not in origin:
        entry.pop("mil", None)


INHERITED = ("budget", "selection", "objective", "mil")
