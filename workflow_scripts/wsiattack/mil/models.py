"""Multiple-instance-learning slide classifiers over precomputed tile features.

Every registered model takes one bag ``features`` (N, D) and returns ``(logits (n_classes,),
attention (N,))``, and records ``in_dim``, ``n_classes`` and ``hparams`` so that a checkpoint can
rebuild it with :func:`build_mil_model`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class GatedABMIL(nn.Module):
    """Gated attention MIL (Ilse et al. 2018).

    h = ReLU(Linear(in_dim, hidden_dim)) (+dropout); a = w^T (tanh(V h) * sigmoid(U h));
    attention = softmax over tiles; slide = sum_i attention_i h_i; logits = Linear(hidden_dim, n_classes).
    """

    def __init__(
        self,
        *,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 128,
        attention_dim: int = 128,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        if in_dim < 1 or n_classes < 2 or hidden_dim < 1 or attention_dim < 1:
            raise ValueError(
                f"GatedABMIL needs in_dim, hidden_dim, attention_dim >= 1 and n_classes >= 2, got "
                f"in_dim={in_dim}, n_classes={n_classes}, hidden_dim={hidden_dim}, attention_dim={attention_dim}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"GatedABMIL dropout must be in [0, 1), got {dropout}")
        self.in_dim = in_dim
        self.n_classes = n_classes
        self.hparams: dict[str, Any] = {"hidden_dim": hidden_dim, "attention_dim": attention_dim, "dropout": dropout}
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden_dim, attention_dim)
        self.attention_u = nn.Linear(hidden_dim, attention_dim)
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """One bag (N, in_dim) -> (logits (n_classes,), attention (N,) summing to 1)."""
        if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] != self.in_dim:
            raise ValueError(f"expected one non-empty bag of shape (N, {self.in_dim}), got {tuple(features.shape)}")
        hidden = self.embed(features)
        gate = torch.tanh(self.attention_v(hidden)) * torch.sigmoid(self.attention_u(hidden))
        attention = torch.softmax(self.attention_w(gate).squeeze(-1), dim=0)
        slide = attention @ hidden
        return self.classifier(slide), attention


MIL_MODELS: dict[str, type[nn.Module]] = {"abmil": GatedABMIL}


def build_mil_model(name: str, *, in_dim: int, n_classes: int, **hparams: Any) -> nn.Module:
    """Instantiate the registered MIL model ``name``; hparams are passed to its constructor."""
    if name not in MIL_MODELS:
        raise ValueError(f"unknown MIL model {name!r} (known: {', '.join(sorted(MIL_MODELS))})")
    return MIL_MODELS[name](in_dim=in_dim, n_classes=n_classes, **hparams)


def mil_model_name(model: nn.Module) -> str:
    """The registry name of ``model``'s class (what a checkpoint records to rebuild it)."""
    for name, model_class in MIL_MODELS.items():
        if type(model) is model_class:
            return name
    raise ValueError(f"{type(model).__name__} is not a registered MIL model (known: {', '.join(sorted(MIL_MODELS))})")
