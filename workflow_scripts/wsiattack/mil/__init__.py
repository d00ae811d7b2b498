"""MIL slide classifiers: models, cross-validation splits, training and checkpoints."""

from typing import Any

from wsiattack.mil.models import MIL_MODELS, GatedABMIL, build_mil_model
from wsiattack.mil.training import (
    MILTrainingSpec,
    load_mil_checkpoint,
    predict_bag,
    save_mil_checkpoint,
    train_mil,
)

__all__ = [
    "MIL_MODELS",
    "GatedABMIL",
    "MILTrainingSpec",
    "build_mil_model",
    "load_mil_checkpoint",
    "make_splits",
    "predict_bag",
    "save_mil_checkpoint",
    "train_mil",
]


def __getattr__(name: str) -> Any:
    # Lazy: splits need pandas and scikit-learn, which the perturb rule's environment (it loads
    # heads for the gray-box oracle) does not have.
    if name == "make_splits":
        from wsiattack.mil.splits import make_splits

        return make_splits
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
