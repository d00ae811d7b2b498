"""Expand a ``sweep`` config block into named attack entries (torch-free: used at DAG build time).

Shape (``methods`` and ``eps`` required)::

    sweep:
      methods: [pgd, fgsm, noise]        # attack methods
      eps: ["1/255", "4/255", 0.03]      # per-value bounds, numbers or "a/b"
      fractions: [0.001, 0.01]           # budget.fraction values        (default [0.001])
      selections: [random]               # tile selections               (default [random])
      base: {objective: cosine, seed: 0, budget: {min_tiles: 1}, steps: 20, mil: abmil}
      params: {cw: {binary_search_steps: 3}}
      prefix: ""                         # prepended to every name       (default "")

Every combination method × eps × fraction × selection becomes one entry named
``{prefix}{method}_eps{eps·255}_f{fraction}_{selection}``, e.g. ``pgd_eps4_f0.001_random``
(eps written in 255ths with at most two decimals). ``base`` holds keys shared by every entry;
a method parameter in ``base`` (``steps``) goes to the methods that have it and is skipped for
the others; ``params.<method>`` overrides it for one method; ``mil`` goes to the entries that use
a MIL head (selection ``attention``, objective ``mil_cross_entropy``). Every entry is checked
against the schema's ``$defs/attack`` like an entry under ``attacks`` (an error names the
generated entry and the key) and comes out normalised (defaults filled, ``step_size`` resolved),
in the order of the lists.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from typing import Any

from wsiattack.attacks.params import METHOD_DEFAULTS, METHOD_PARAMS, SELECTIONS, uses_mil_head
from wsiattack.errors import ConfigError
from wsiattack.schema import check_attack_entry, parse_pixel_fraction

SWEEP_KEYS = {"methods", "eps", "fractions", "selections", "base", "params", "prefix"}
_BASE_KEYS = {"objective", "seed", "budget", "mil"}  # besides method parameters
_SET_BY_GRID = {"method": "methods", "eps": "eps", "selection": "selections"}
_GRID_DEFAULTS = {"fractions": [0.001], "selections": ["random"]}


def expand_sweep(sweep: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Named attack entries for every combination of the sweep's grid."""
    _check_shape(sweep)
    grid = {
        key: list(sweep.get(key, _GRID_DEFAULTS.get(key, []))) for key in ("methods", "eps", "fractions", "selections")
    }
    eps_values = [_pixel_fraction(value, where=f"sweep.eps[{i}]") for i, value in enumerate(grid["eps"])]
    entries: dict[str, dict[str, Any]] = {}
    for method, (eps, spelled), fraction, selection in itertools.product(
        grid["methods"], zip(eps_values, grid["eps"], strict=True), grid["fractions"], grid["selections"]
    ):
        name = f"{sweep.get('prefix', '')}{method}_eps{_in_255ths(eps)}_f{format(fraction, 'g')}_{selection}"
        if name in entries:
            raise ConfigError(
                f"config: sweep.eps: {spelled!r} gives the same name {name!r} as another eps value; list each bound once"
            )
        entry = _entry(sweep, method=method, eps=eps, fraction=fraction, selection=selection)
        entries[name] = check_attack_entry(entry, where=f"sweep ({name})")
    return entries


def _entry(sweep: Mapping[str, Any], *, method: str, eps: float, fraction: float, selection: str) -> dict[str, Any]:
    base = copy.deepcopy(dict(sweep.get("base", {})))
    own = METHOD_DEFAULTS[method]
    entry = {key: value for key, value in base.items() if key not in METHOD_PARAMS or key in own}
    entry.update(copy.deepcopy(dict(sweep.get("params", {}).get(method, {}))))
    entry.update(method=method, eps=eps, selection=selection)
    entry["budget"] = {**entry.get("budget", {}), "fraction": float(fraction)}
    if not uses_mil_head(entry):
        entry.pop("mil", None)  # shared by the grid, used only where a head ranks or scores
    return entry


def _check_shape(sweep: Mapping[str, Any]) -> None:
    unknown = sorted(set(sweep) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"config: sweep.{unknown[0]}: unknown key (allowed: {', '.join(sorted(SWEEP_KEYS))})")
    for key in ("methods", "eps"):
        if not sweep.get(key):
            raise ConfigError(f"config: sweep.{key}: required, a non-empty list")
    _check_members(sweep.get("methods", []), allowed=METHOD_DEFAULTS, where="sweep.methods")
    _check_members(sweep.get("selections", _GRID_DEFAULTS["selections"]), allowed=SELECTIONS, where="sweep.selections")
    for i, fraction in enumerate(sweep.get("fractions", _GRID_DEFAULTS["fractions"])):
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
            raise ConfigError(f"config: sweep.fractions[{i}]: {fraction!r} must be a number in (0, 1]")
    for method in sweep.get("params", {}):
        if method not in sweep["methods"]:
            raise ConfigError(
                f"config: sweep.params.{method}: not one of sweep.methods ({', '.join(sweep['methods'])})"
            )
    base = sweep.get("base", {})
    _check_keys(base, allowed=_BASE_KEYS | METHOD_PARAMS, where="sweep.base")
    _check_keys(base.get("budget", {}), allowed={"min_tiles", "max_tiles", "fraction"}, where="sweep.base.budget")
    for method, params in sweep.get("params", {}).items():  # another method's parameter: normalise_attack says so
        _check_keys(params, allowed=METHOD_PARAMS, where=f"sweep.params.{method}")
    for key, grid_key in _SET_BY_GRID.items():
        if key in base:
            raise ConfigError(f"config: sweep.base.{key}: set by the grid; list the values in sweep.{grid_key} instead")
    if "fraction" in base.get("budget", {}):
        raise ConfigError(
            "config: sweep.base.budget.fraction: set by the grid; list the values in sweep.fractions instead"
        )


def _check_keys(mapping: Mapping[str, Any], *, allowed: set[str] | frozenset[str], where: str) -> None:
    """Unknown keys would otherwise ride along into every entry unnoticed."""
    unknown = sorted(set(mapping) - set(allowed) - set(_SET_BY_GRID))
    if unknown:
        raise ConfigError(
            f"config: {where}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed)) or 'none'})"
        )


def _check_members(values: list[Any], *, allowed: Any, where: str) -> None:
    if len(set(map(str, values))) != len(values):
        raise ConfigError(f"config: {where}: duplicate values in {values}")
    for i, value in enumerate(values):
        if value not in allowed:
            raise ConfigError(f"config: {where}[{i}]: unknown {value!r} (known: {', '.join(allowed)})")


def _pixel_fraction(value: float | str, *, where: str) -> float:
    eps = parse_pixel_fraction(value, where=where)
    if eps <= 0:
        raise ConfigError(f"config: {where}: eps must be > 0")
    return eps


def _in_255ths(eps: float) -> str:
    """4/255 -> "4", 0.03 -> "7.65": readable in the grey levels people think in."""
    return f"{eps * 255:.2f}".rstrip("0").rstrip(".")
