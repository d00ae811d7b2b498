"""Custom encoders: a user's own ``torch.nn.Module`` factory, checked into an ``EncoderSpec``;
``resolve_spec`` gives the spec of any encoder name, registry entry or custom. Torch-free."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from wsiattack.encoders.registry import (
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRECISIONS,
    READOUTS,
    EncoderSpec,
    get_spec,
)
from wsiattack.errors import EncoderError
from wsiattack.names import is_valid_name


def resolve_spec(name: str, *, custom: EncoderSpec | Mapping[str, Any] | None = None) -> EncoderSpec:
    """The registry entry ``name``, or the custom spec given for it (a spec or its mapping)."""
    if custom is None:
        return get_spec(name)
    spec = custom if isinstance(custom, EncoderSpec) else custom_spec(name, custom)
    if spec.name != name:
        raise EncoderError(f"custom encoder {name!r}: the spec given is named {spec.name!r}")
    return spec


CUSTOM_KEYS = ("factory", "input_px", "mean", "std", "embed_dim", "readout", "precision", "kwargs", "n_params")
CUSTOM_REQUIRED = ("factory", "input_px", "embed_dim", "readout")
_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def custom_spec(name: str, mapping: Mapping[str, Any]) -> EncoderSpec:
    """Validate a custom encoder entry (``{"factory": "pkg.mod:build", ...}``) into a spec.

    ``kwargs`` go to the factory; mean/std default to ImageNet's; precision to float32.
    ``n_params`` (optional) sizes the GPU jobs' memory; without it they get the largest registry
    encoder's size.
    """
    where = f"custom encoder {name!r}"
    _check_custom_keys(where, name, mapping)
    return EncoderSpec(
        name=name,
        architecture=_factory_path(where, mapping["factory"]),
        input_px=_positive_int(where, "input_px", mapping["input_px"]),
        mean=_triple(where, "mean", mapping.get("mean", IMAGENET_MEAN), positive=False),
        std=_triple(where, "std", mapping.get("std", IMAGENET_STD), positive=True),
        readout=_choice(where, "readout", mapping["readout"], READOUTS),
        embed_dim=_positive_int(where, "embed_dim", mapping["embed_dim"]),
        precision=_choice(where, "precision", mapping.get("precision", "float32"), PRECISIONS),
        weights="factory",
        loader="factory",
        build_kwargs=_json_kwargs(where, mapping.get("kwargs", {})),
        source=f"factory {mapping['factory']}",
        n_params=_positive_int(where, "n_params", mapping["n_params"]) if "n_params" in mapping else None,
    )


def _check_custom_keys(where: str, name: str, mapping: Mapping[str, Any]) -> None:
    if not is_valid_name(name):
        raise EncoderError(f"{where}: names are letters, digits, '_', '.', '-' (used in output paths)")
    if name in ENCODERS:
        raise EncoderError(f"{where}: the name is taken by a registry encoder; choose another name")
    if not isinstance(mapping, Mapping):
        raise EncoderError(f"{where}: expected a mapping of {', '.join(CUSTOM_KEYS)}")
    unknown = sorted(set(mapping) - set(CUSTOM_KEYS))
    if unknown:
        raise EncoderError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(CUSTOM_KEYS)})")
    missing = [key for key in CUSTOM_REQUIRED if key not in mapping]
    if missing:
        raise EncoderError(f"{where}: missing key {missing[0]!r} (required: {', '.join(CUSTOM_REQUIRED)})")


def _factory_path(where: str, value: Any) -> str:
    if not isinstance(value, str) or not _FACTORY.match(value):
        raise EncoderError(f"{where}: factory: {value!r} is not of the form 'package.module:function'")
    return value


def _positive_int(where: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise EncoderError(f"{where}: {key}: {value!r} is not a positive integer")
    return value


def _triple(where: str, key: str, value: Any, *, positive: bool) -> tuple[float, float, float]:
    ok = isinstance(value, list | tuple) and len(value) == 3
    ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    if not ok or (positive and min(value) <= 0):
        kind = "three positive numbers" if positive else "three numbers"
        raise EncoderError(f"{where}: {key}: {value!r} is not {kind} (one per RGB channel)")
    return (float(value[0]), float(value[1]), float(value[2]))


def _choice(where: str, key: str, value: Any, allowed: tuple[str, ...]) -> Any:
    if value not in allowed:
        raise EncoderError(f"{where}: {key}: {value!r} is not one of {', '.join(allowed)}")
    return value


def _json_kwargs(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise EncoderError(f"{where}: kwargs: expected a mapping of argument names to values")
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError):
        raise EncoderError(f"{where}: kwargs: values must be plain (numbers, strings, lists, mappings)") from None
