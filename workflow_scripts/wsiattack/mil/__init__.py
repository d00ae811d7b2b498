"""MIL slide classifiers: models, cross-validation splits, training and checkpoints."""

from wsiattack.mil.models import MIL_MODELS, GatedABMIL, build_mil_model
from wsiattack.mil.splits import make_splits
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
