"""Where a defence enters the workflow's jobs: the encoder a job runs, and the head it evaluates.

A rule's spec carries the defence entry (``defences.params``, with its ``name``) under
``defence``. Tile defences wrap the encoder (extraction, re-embedding, the adaptive attack: the
pipeline draws a randomised defence once per tile, its adaptive attacker averages
``eot_samples`` draws, and the adaptive attack's tiles are re-embedded by the pipeline:
``pipeline_of``); head defences wrap each fold's MIL head (evaluation, and the gray-box
oracle of the adaptive attack): ``aggregation.defended_head``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from wsiattack.defences.params import is_tile_defence
from wsiattack.defences.transforms import DefendedEncoder, build_defence
from wsiattack.encoders.model import build_encoder


def encoder_for(spec: Mapping[str, Any], *, attacker: bool = False) -> nn.Module:
    """The job's encoder: ``build_encoder(**spec["encoder"])``, behind its tile defence if any."""
    encoder = build_encoder(**spec["encoder"])
    defence = spec.get("defence")
    if not defence or not is_tile_defence(defence):
        return encoder
    eot_samples = defence["eot_samples"] if attacker else 1
    return DefendedEncoder(defence=build_defence(defence), encoder=encoder, eot_samples=eot_samples).eval()


def pipeline_of(encoder: nn.Module) -> nn.Module:
    """What the defended pipeline computes for the attacker's model ``encoder``: one draw of a
    randomised defence where the attacker averages ``eot_samples`` (same defence and weights)."""
    if isinstance(encoder, DefendedEncoder) and encoder.eot_samples > 1:
        return DefendedEncoder(defence=encoder.defence, encoder=encoder.encoder, eot_samples=1).eval()
    return encoder
