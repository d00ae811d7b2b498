"""The config schema (``schemas/config.schema.yaml``) and the checks built on it that more than the
config needs: one attack entry checked and normalised (the sweep expands into such entries), and
pixel fractions such as ``"4/255"``. Torch-free; ``config`` re-exports what rule code uses.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any

import jsonschema
import yaml

from wsiattack.attacks.params import (
    ATTACK_PRECISIONS,
    MASK_SOURCES,
    METHOD_DEFAULTS,
    NORMS,
    OBJECTIVES,
    SELECTIONS,
    normalise_attack,
)
from wsiattack.errors import ConfigError
from wsiattack.names import NAME_PATTERN


@cache
def load_schema() -> dict[str, Any]:
    """The config schema, with the name pattern and the attack vocabulary's enums filled in."""
    schema = yaml.safe_load(resources.files("wsiattack").joinpath("schemas/config.schema.yaml").read_text())
    schema["$defs"]["name"]["pattern"] = f"^{NAME_PATTERN}$"
    attack = schema["$defs"]["attack"]["properties"]
    vocabulary = {
        "method": METHOD_DEFAULTS,
        "norm": NORMS,
        "objective": OBJECTIVES,
        "selection": SELECTIONS,
        "mask_source": MASK_SOURCES,
        "precision": ATTACK_PRECISIONS,
    }
    for key, names in vocabulary.items():
        attack[key]["enum"] = list(names)
    return schema


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


Validator = _fill_defaults(jsonschema.Draft202012Validator)


def where_of(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def check_attack_entry(entry: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """One attack entry checked against the schema's ``$defs/attack`` (defaults filled), its pixel
    fractions parsed and its method's defaults filled. ``where`` names it in errors: a sweep's
    generated entries come through here too, so a bad sweep value names the entry and the key."""
    checked = copy.deepcopy(dict(entry))
    errors = sorted(Validator(attack_schema()).iter_errors(checked), key=lambda e: list(e.absolute_path))
    if errors:
        path = where_of(errors[0])
        raise ConfigError(f"config: {where}{'' if path == '<top level>' else '.' + path}: {short_message(errors[0])}")
    for key in ("eps", "step_size"):
        if checked.get(key) is not None:
            checked[key] = parse_pixel_fraction(checked[key], where=f"{where}.{key}")
    return normalise_attack(checked, where=where)


@cache
def attack_schema() -> dict[str, Any]:
    """``$defs/attack`` as a schema of its own (with the ``$defs`` its references point into)."""
    schema = load_schema()
    return {"$defs": schema["$defs"], **schema["$defs"]["attack"]}


def short_message(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        return f"{error.message} (allowed: {', '.join(sorted(error.schema.get('properties', {})))})"
    if error.validator == "oneOf" and error.context:
        return f"{error.instance!r} is neither a number in [0, 1] nor a fraction such as '4/255'"
    return error.message


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
