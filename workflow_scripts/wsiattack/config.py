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
from functools import cache
from importlib import resources
from typing import Any

import jsonschema
import yaml

from wsiattack.errors import ConfigError

DEMO_SAMPLES = "results/demo/samples.csv"


@cache
def load_schema() -> dict[str, Any]:
    text = resources.files("wsiattack").joinpath("schemas/config.schema.yaml").read_text()
    return yaml.safe_load(text)


def _fill_defaults(validator_class: type) -> type:
    """Extend a jsonschema validator so that ``default`` values are written into the instance."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, subschema in properties.items():
                subschema = _resolve(validator, subschema)
                if "default" in subschema and key not in instance:
                    instance[key] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _resolve(validator, subschema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in subschema and "default" not in subschema:
        return validator._resolver.lookup(subschema["$ref"]).contents
    return subschema


_Validator = _fill_defaults(jsonschema.Draft202012Validator)


def _where(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return a validated copy of ``config`` with defaults filled; raise ConfigError otherwise."""
    checked = copy.deepcopy(dict(config))
    errors = sorted(_Validator(load_schema()).iter_errors(checked), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        raise ConfigError(f"config: {_where(error)}: {_short_message(error)}")
    _normalise_attacks(checked)
    _check_encoders(checked)
    return checked


def _normalise_attacks(config: dict[str, Any]) -> None:
    """Check and normalise every attack entry, add the sweep's entries, resolve MIL heads (torch-free)."""
    from wsiattack.attacks.params import resolve_mil
    from wsiattack.attacks.sweep import expand_sweep

    attacks = {name: check_attack_entry(entry, where=f"attacks.{name}") for name, entry in config["attacks"].items()}
    wheres = {name: f"attacks.{name}" for name in attacks}
    for name, entry in expand_sweep(config["sweep"]).items() if "sweep" in config else ():
        if name in attacks:
            raise ConfigError(f"config: sweep: entry {name!r} has the name of an attack under attacks; rename one")
        attacks[name], wheres[name] = entry, f"sweep ({name})"
    if not attacks:
        raise ConfigError("config: attacks: no attack defined (add an entry under attacks or a sweep)")
    for name, entry in attacks.items():
        resolve_mil(entry, mil_models=config["mil"]["models"], where=wheres[name])
    config["attacks"] = attacks


def check_attack_entry(entry: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """One attack entry checked against the schema's ``$defs/attack`` (defaults filled), its pixel
    fractions parsed and its method's defaults filled. ``where`` names it in errors: a sweep's
    generated entries come through here too, so a bad sweep value names the entry and the key."""
    from wsiattack.attacks.params import normalise_attack

    checked = copy.deepcopy(dict(entry))
    errors = sorted(_Validator(_attack_schema()).iter_errors(checked), key=lambda e: list(e.absolute_path))
    if errors:
        path = _where(errors[0])
        raise ConfigError(f"config: {where}{'' if path == '<top level>' else '.' + path}: {_short_message(errors[0])}")
    for key in ("eps", "step_size"):
        if checked.get(key) is not None:
            checked[key] = parse_pixel_fraction(checked[key], where=f"{where}.{key}")
    return normalise_attack(checked, where=where)


@cache
def _attack_schema() -> dict[str, Any]:
    """``$defs/attack`` as a schema of its own (with the ``$defs`` its references point into)."""
    schema = load_schema()
    return {"$defs": schema["$defs"], **schema["$defs"]["attack"]}


def _short_message(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        return f"{error.message} (allowed: {', '.join(sorted(error.schema.get('properties', {})))})"
    if error.validator == "oneOf" and error.context:
        return f"{error.instance!r} is neither a number in [0, 1] nor a fraction such as '4/255'"
    return error.message


def _check_encoders(config: dict[str, Any]) -> None:
    """Every listed encoder is known, and its weights can be had (checked before any job runs)."""
    from wsiattack.encoders import registry  # torch-free
    from wsiattack.errors import EncoderError

    custom = config["custom_encoders"]
    for name in config["encoders"]:
        if name not in registry.ENCODERS and name not in custom:
            known = ", ".join([*registry.ENCODERS, *custom])
            raise ConfigError(
                f"config: encoders: unknown encoder {name!r} (known: {known}; or define it under custom_encoders)"
            )
        try:
            registry.preflight(name, **{k: v for k, v in encoder_spec(config, name).items() if k != "name"})
        except EncoderError as error:
            raise ConfigError(f"config: encoders: {error}") from None
    for name in config["encoder_weights"]:
        if name not in config["encoders"]:
            raise ConfigError(f"config: encoder_weights: {name!r} is not listed under encoders")


def encoder_spec(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """What builds encoder ``name``: ``build_encoder(**spec)``. Part of the extract/perturb/reembed specs."""
    return {
        "name": name,
        "checkpoint": config["encoder_weights"].get(name),
        "custom": config["custom_encoders"].get(name),
    }


def parse_pixel_fraction(value: float | str, *, where: str) -> float:
    """``0.0157`` or ``"4/255"`` -> float in [0, 1]."""
    if isinstance(value, str):
        numerator, denominator = (float(part) for part in value.split("/"))
        if denominator == 0:
            raise ConfigError(f"config: {where}: division by zero in {value!r}")
        value = numerator / denominator
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"config: {where}: {value} is outside [0, 1]")
    return value


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


def split_spec(config: Mapping[str, Any]) -> dict[str, Any]:
    return {"folds": config["mil"]["folds"], "seed": config["mil"]["seed"], "classes": config["classes"]}
