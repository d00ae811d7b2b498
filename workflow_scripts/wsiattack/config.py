"""Configuration: schema validation with defaults, normalised per-rule specs.

Each rule's ``params.spec`` is the sorted JSON of exactly the config entries that rule depends
on (see ``rules/common.smk``). Snakemake re-runs a job when its params change, so editing one
attack re-runs only that attack's jobs; normalising here (``"4/255"`` -> float, defaults filled)
means that rewriting a value in an equivalent form re-runs nothing.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from wsiattack.attacks.params import resolve_mil
from wsiattack.attacks.sweep import expand_sweep
from wsiattack.attacks.transfer import check_derived, expand_transfer
from wsiattack.defences.params import normalise_defences
from wsiattack.errors import ConfigError
from wsiattack.names import BACKDOOR_ALL_SHOTS, BACKDOOR_CLEAN_HEAD

# check_attack_entry, load_schema and parse_pixel_fraction are also used as wsiconfig.* by rule code
from wsiattack.schema import (  # noqa: F401
    Validator,
    check_attack_entry,
    load_schema,
    parse_pixel_fraction,
    short_message,
    where_of,
)

DEMO_SAMPLES = "results/demo/samples.csv"


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return a validated copy of ``config`` with defaults filled; raise ConfigError otherwise."""
    checked = copy.deepcopy(dict(config))
    errors = sorted(Validator(load_schema()).iter_errors(checked), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        raise ConfigError(f"config: {where_of(error)}: {short_message(error)}")
    _normalise_attacks(checked)
    if "backdoor" in checked:
        _normalise_backdoor(checked)
    if "defences" in checked:
        normalise_defences(checked["defences"], attacks=checked["attacks"])
    _check_encoders(checked)
    return checked


def _normalise_backdoor(config: dict[str, Any]) -> None:
    """Targets (null: every class) and the MIL model (null: the first) resolved; eps as a number."""
    backdoor, classes, models = config["backdoor"], config["classes"], config["mil"]["models"]
    backdoor["targets"] = list(classes) if backdoor["targets"] is None else backdoor["targets"]
    unknown = [target for target in backdoor["targets"] if target not in classes]
    if unknown:
        raise ConfigError(f"config: backdoor: targets: {unknown} not under classes ({', '.join(classes)})")
    backdoor["mil"] = backdoor["mil"] or models[0]
    if backdoor["mil"] not in models:
        raise ConfigError(f"config: backdoor: mil: {backdoor['mil']!r} is not under mil.models ({', '.join(models)})")
    backdoor["eps"] = parse_pixel_fraction(backdoor["eps"], where="backdoor.eps")


def _normalise_attacks(config: dict[str, Any]) -> None:
    """Check and normalise every attack entry, add the sweep's entries, resolve MIL heads (torch-free)."""
    attacks = {name: check_attack_entry(entry, where=f"attacks.{name}") for name, entry in config["attacks"].items()}
    wheres = {name: f"attacks.{name}" for name in attacks}
    for name, entry in expand_sweep(config["sweep"]).items() if "sweep" in config else ():
        if name in attacks:
            raise ConfigError(f"config: sweep: entry {name!r} has the name of an attack under attacks; rename one")
        attacks[name], wheres[name] = entry, f"sweep ({name})"
    if not attacks:
        raise ConfigError("config: attacks: no attack defined (add an entry under attacks or a sweep)")
    for name, entry in expand_transfer(config["transfer"], attacks).items() if "transfer" in config else ():
        if name in attacks:
            raise ConfigError(f"config: transfer: entry {name!r} has the name of an attack under attacks; rename one")
        attacks[name], wheres[name] = check_attack_entry(entry, where=f"transfer ({name})"), f"transfer ({name})"
    for name, entry in attacks.items():
        if entry["method"] != "shuffled":
            resolve_mil(entry, mil_models=config["mil"]["models"], where=wheres[name])
    check_derived(attacks, wheres=wheres, known_encoders=known_encoders(config))
    config["attacks"] = attacks


def known_encoders(config: Mapping[str, Any]) -> set[str]:
    from wsiattack.encoders import registry  # torch-free

    return {*registry.ENCODERS, *config["custom_encoders"]}


def surrogates(config: Mapping[str, Any]) -> list[str]:
    """The encoders that transfer attacks are crafted on (each needs no clean features or heads)."""
    return sorted({entry["surrogate"] for entry in config["attacks"].values() if entry.get("surrogate")})


def _check_encoders(config: dict[str, Any]) -> None:
    """Every listed encoder is known, and its weights can be had (checked before any job runs)."""
    from wsiattack.encoders import preflight, registry  # torch-free
    from wsiattack.errors import EncoderError

    custom = config["custom_encoders"]
    for name in dict.fromkeys([*config["encoders"], *surrogates(config)]):
        if name not in registry.ENCODERS and name not in custom:
            known = ", ".join([*registry.ENCODERS, *custom])
            raise ConfigError(
                f"config: encoders: unknown encoder {name!r} (known: {known}; or define it under custom_encoders)"
            )
        try:
            preflight.preflight(name, **{k: v for k, v in encoder_spec(config, name).items() if k != "name"})
        except EncoderError as error:
            raise ConfigError(f"config: encoders: {error}") from None
    for name in config["encoder_weights"]:
        if name not in config["encoders"] and name not in surrogates(config):
            raise ConfigError(f"config: encoder_weights: {name!r} is not listed under encoders (nor a surrogate)")


def encoder_spec(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """What builds encoder ``name``: ``build_encoder(**spec)``. Part of the extract/perturb/reembed
    specs, so it holds what the outputs depend on: not a custom encoder's ``n_params``, which only
    sizes the jobs' memory (adding it re-runs nothing)."""
    custom = config["custom_encoders"].get(name)
    return {
        "name": name,
        "checkpoint": config["encoder_weights"].get(name),
        "custom": None if custom is None else {k: v for k, v in custom.items() if k != "n_params"},
    }


def spec_json(spec: Any) -> str:
    """The canonical form of a spec: sorted keys, no whitespace (what Snakemake compares)."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def tiling_spec(config: Mapping[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(config["tiling"])


def attack_spec(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    if name not in config["attacks"]:
        raise ConfigError(f"config: attacks: unknown attack {name!r} (known: {', '.join(config['attacks'])})")
    return {"name": name, **copy.deepcopy(config["attacks"][name])}


def mil_spec(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """Training settings of one MIL model: its own hparams only, so editing another's re-runs nothing here."""
    spec = {k: copy.deepcopy(v) for k, v in config["mil"].items() if k not in ("models", "hparams")}
    return {"model": model, **spec, "hparams": copy.deepcopy(config["mil"]["hparams"].get(model, {}))}


# Backdoor settings a job's result does not depend on (left out of its spec, so editing them re-runs nothing there)
_BACKDOOR_UNUSED = {
    BACKDOOR_CLEAN_HEAD: ("poison_rate", "eps", "step_size"),  # the clean head: nothing poisoned, tested with the patch
    "patch": ("eps", "step_size"),
    "noise": ("patch_px", "corner"),
    "bapl": (),
}


def backdoor_spec(config: Mapping[str, Any], *, trigger: str, target: str | None, shots: str) -> dict[str, Any]:
    """One backdoor job's settings (``wsiattack.backdoor.run_backdoor``): what its head and trigger
    depend on; ``trigger`` "clean" is the clean head (no target), ``shots`` a number or "all"."""
    dropped = {"triggers", "targets", "shots", *_BACKDOOR_UNUSED[trigger]}
    settings = {k: copy.deepcopy(v) for k, v in config["backdoor"].items() if k not in dropped}
    mil = {**mil_spec(config, settings.pop("mil")), "classes": config["classes"]}
    return {
        "backdoor": {**settings, "trigger": trigger, "target": target, "shots": shots},
        "mil": mil,
        "tile_px": config["tiling"]["tile_px"],
    }


def backdoor_shots(config: Mapping[str, Any]) -> list[str]:
    """The backdoor block's shots settings as job names: a number of slides per class, or "all"."""
    return [BACKDOOR_ALL_SHOTS if shots is None else str(shots) for shots in config["backdoor"]["shots"]]


def split_spec(config: Mapping[str, Any]) -> dict[str, Any]:
    return {"folds": config["mil"]["folds"], "seed": config["mil"]["seed"], "classes": config["classes"]}
