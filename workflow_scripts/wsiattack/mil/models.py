"""Multiple-instance-learning slide classifiers over precomputed tile features.

Every registered model takes one bag ``features`` (N, D) and returns ``(logits (n_classes,),
tile_weights (N,))``. ``tile_weights`` are non-negative, sum to 1 and say where the head looks;
they rank tiles for the gray-box ``attention`` selection and give ``attention_on_perturbed`` in
the evaluation tables:

==========  ===================================================================================
abmil       gated attention (softmax over tiles)
clam_sb     gated attention of the single attention branch
dsmil       the attention stream's weights for the predicted class (similarity to the critical
            instance)
transmil    the class token's attention over the tiles in the first layer (exact softmax, mean
            over heads; padding copies folded back onto their tiles): there it reads the tiles
            themselves. In the second layer the tokens are already mixed and its attention does
            not localise (toy task of tests/test_mil.py: key tiles get 1.1x the mean weight of
            the others there, 5.9x in the first layer)
max         no attention: softmax over tiles of the instance logits of the predicted class,
            which ranks tiles by instance score (the arg-max tile sets the slide logit)
mean        no attention (every tile weighs 1/N in the pool, which would rank nothing): the same
            softmax of the predicted class's instance logits; the slide logit is their mean
==========  ===================================================================================

Each model records ``in_dim``, ``n_classes`` and ``hparams`` so that a checkpoint can rebuild it
with :func:`build_mil_model`, and ``loss`` gives its training objective (slide cross-entropy, plus
CLAM's instance clustering or DSMIL's two streams).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MILModel(nn.Module):
    """Shared checks, the bag shape contract and the default loss (class-weighted slide CE)."""

    def __init__(self, *, in_dim: int, n_classes: int, hparams: dict[str, Any]) -> None:
        super().__init__()
        name = type(self).__name__
        if in_dim < 1 or n_classes < 2:
            raise ValueError(f"{name} needs in_dim >= 1 and n_classes >= 2, got in_dim={in_dim}, n_classes={n_classes}")
        sizes = {key: value for key, value in hparams.items() if key.endswith("_dim") or key in ("heads", "k_sample")}
        if any(value < 1 for value in sizes.values()):
            raise ValueError(f"{name} needs sizes >= 1, got {sizes}")
        if not 0.0 <= hparams.get("dropout", 0.0) < 1.0:
            raise ValueError(f"{name} dropout must be in [0, 1), got {hparams['dropout']}")
        self.in_dim = in_dim
        self.n_classes = n_classes
        self.hparams = dict(hparams)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """One bag (N, in_dim) -> (logits (n_classes,), tile weights (N,) summing to 1)."""
        if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] != self.in_dim:
            raise ValueError(f"expected one non-empty bag of shape (N, {self.in_dim}), got {tuple(features.shape)}")
        return self.bag_forward(features)

    def bag_forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def loss(self, features: Tensor, target: Tensor, *, class_weights: Tensor) -> Tensor:
        """Training loss of one bag; ``target`` is a (1,) class index."""
        logits, _ = self(features)
        return slide_cross_entropy(logits, target, class_weights=class_weights)


def slide_cross_entropy(logits: Tensor, target: Tensor, *, class_weights: Tensor) -> Tensor:
    # reduction="sum", not "mean": with one bag per step the weighted mean divides the class
    # weight back out (w*l / w), which would silently disable the class balancing.
    return F.cross_entropy(logits[None], target, weight=class_weights, reduction="sum")


def _embedding(in_dim: int, hidden_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))


def _instance_weights(instance_logits: Tensor, logits: Tensor) -> Tensor:
    """Softmax over tiles of the predicted class's instance logits (for heads without attention)."""
    return torch.softmax(instance_logits[:, logits.argmax()], dim=0)


class _InstancePool(MILModel):
    """Per-tile class scores of an embedded tile, pooled over the bag by ``pool`` (no attention)."""

    def __init__(self, *, in_dim: int, n_classes: int, hidden_dim: int = 128, dropout: float = 0.25) -> None:
        super().__init__(in_dim=in_dim, n_classes=n_classes, hparams={"hidden_dim": hidden_dim, "dropout": dropout})
        self.embed = _embedding(in_dim, hidden_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def bag_forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        instance_logits = self.classifier(self.embed(features))
        logits = self.pool(instance_logits)
        return logits, _instance_weights(instance_logits, logits)

    def pool(self, instance_logits: Tensor) -> Tensor:
        raise NotImplementedError


class MeanPool(_InstancePool):
    """Mean pooling: logits = classifier(mean_i h_i) = mean_i classifier(h_i) (the head is linear)."""

    def pool(self, instance_logits: Tensor) -> Tensor:
        return instance_logits.mean(dim=0)


class MaxPool(_InstancePool):
    """Max pooling: per-tile class scores, the slide's logit of each class is its highest tile's."""

    def pool(self, instance_logits: Tensor) -> Tensor:
        return instance_logits.max(dim=0).values


class GatedAttention(nn.Module):
    """a_i = w^T (tanh(V h_i) * sigmoid(U h_i)), softmax over tiles (Ilse et al. 2018)."""

    def __init__(self, hidden_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.attention_v = nn.Linear(hidden_dim, attention_dim)
        self.attention_u = nn.Linear(hidden_dim, attention_dim)
        self.attention_w = nn.Linear(attention_dim, 1)

    def forward(self, hidden: Tensor) -> Tensor:
        gate = torch.tanh(self.attention_v(hidden)) * torch.sigmoid(self.attention_u(hidden))
        return torch.softmax(self.attention_w(gate).squeeze(-1), dim=0)


class GatedABMIL(MILModel):
    """Gated attention MIL (Ilse et al. 2018): slide = sum_i a_i h_i, logits = Linear(slide)."""

    def __init__(
        self, *, in_dim: int, n_classes: int, hidden_dim: int = 128, attention_dim: int = 128, dropout: float = 0.25
    ) -> None:
        hparams = {"hidden_dim": hidden_dim, "attention_dim": attention_dim, "dropout": dropout}
        super().__init__(in_dim=in_dim, n_classes=n_classes, hparams=hparams)
        self.embed = _embedding(in_dim, hidden_dim, dropout)
        self.attention = GatedAttention(hidden_dim, attention_dim)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def bag_forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.embed(features)
        attention = self.attention(hidden)
        return self.classifier(attention @ hidden), attention


class CLAMSB(MILModel):
    """CLAM single-branch (Lu et al. 2021): gated ABMIL plus instance-level clustering.

    In training, the ``k_sample`` most and least attended tiles of a bag are pseudo-labelled in
    and out of the bag's class, and a per-class instance classifier learns to tell them apart;
    loss = bag_weight * slide CE + (1 - bag_weight) * instance CE. Binary (no subtyping loss).
    """

    def __init__(
        self,
        *,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 128,
        attention_dim: int = 128,
        dropout: float = 0.25,
        k_sample: int = 8,
        bag_weight: float = 0.7,
    ) -> None:
        hparams = {
            "hidden_dim": hidden_dim,
            "attention_dim": attention_dim,
            "dropout": dropout,
            "k_sample": k_sample,
            "bag_weight": bag_weight,
        }
        super().__init__(in_dim=in_dim, n_classes=n_classes, hparams=hparams)
        if not 0.0 <= bag_weight <= 1.0:
            raise ValueError(f"CLAMSB bag_weight must be in [0, 1], got {bag_weight}")
        self.embed = _embedding(in_dim, hidden_dim, dropout)
        self.attention = GatedAttention(hidden_dim, attention_dim)
        self.classifier = nn.Linear(hidden_dim, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden_dim, 2) for _ in range(n_classes))

    def _parts(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hidden = self.embed(features)
        attention = self.attention(hidden)
        return self.classifier(attention @ hidden), attention, hidden

    def bag_forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        logits, attention, _ = self._parts(features)
        return logits, attention

    def loss(self, features: Tensor, target: Tensor, *, class_weights: Tensor) -> Tensor:
        logits, attention, hidden = self._parts(features)
        bag_loss = slide_cross_entropy(logits, target, class_weights=class_weights)
        k = min(self.hparams["k_sample"], len(hidden) // 2)
        if k == 0:  # a bag of one tile has nothing to contrast
            return bag_loss
        top = torch.topk(attention, k).indices
        bottom = torch.topk(-attention, k).indices
        instances = torch.cat([hidden[top], hidden[bottom]])
        pseudo = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(hidden.device)
        instance_loss = F.cross_entropy(self.instance_classifiers[int(target)](instances), pseudo)
        weight = self.hparams["bag_weight"]
        return weight * bag_loss + (1.0 - weight) * instance_loss


class DSMIL(MILModel):
    """Dual-stream MIL (Li et al. 2021).

    Stream 1: per-tile class scores, max over tiles. Stream 2: for each class, attention of every
    tile by the similarity of its query to the query of that class's critical (highest-scoring)
    tile; the attention-pooled values go through a 1-D convolution to that class's logit.
    logits = mean of the two streams; loss = mean of their cross-entropies.
    """

    def __init__(
        self, *, in_dim: int, n_classes: int, hidden_dim: int = 128, query_dim: int = 128, dropout: float = 0.25
    ) -> None:
        hparams = {"hidden_dim": hidden_dim, "query_dim": query_dim, "dropout": dropout}
        super().__init__(in_dim=in_dim, n_classes=n_classes, hparams=hparams)
        self.embed = _embedding(in_dim, hidden_dim, dropout)
        self.instance_classifier = nn.Linear(hidden_dim, n_classes)
        self.query = nn.Sequential(
            nn.Linear(hidden_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh()
        )
        self.value = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, hidden_dim), nn.ReLU())
        self.bag_classifier = nn.Conv1d(n_classes, n_classes, kernel_size=hidden_dim)

    def _streams(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hidden = self.embed(features)
        instance_logits = self.instance_classifier(hidden)
        max_logits, critical = instance_logits.max(dim=0)
        queries = self.query(hidden)
        attention = torch.softmax(queries @ queries[critical].T / math.sqrt(queries.shape[1]), dim=0)  # (N, C)
        pooled = attention.T @ self.value(hidden)  # (C, hidden)
        bag_logits = self.bag_classifier(pooled[None]).reshape(self.n_classes)
        return max_logits, bag_logits, attention

    def bag_forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        max_logits, bag_logits, attention = self._streams(features)
        logits = 0.5 * (max_logits + bag_logits)
        return logits, attention[:, logits.argmax()]

    def loss(self, features: Tensor, target: Tensor, *, class_weights: Tensor) -> Tensor:
        max_logits, bag_logits, _ = self._streams(features)
        return 0.5 * (
            slide_cross_entropy(max_logits, target, class_weights=class_weights)
            + slide_cross_entropy(bag_logits, target, class_weights=class_weights)
        )


class NystromAttention(nn.Module):
    """Multi-head self-attention with the Nyström approximation (Xiong et al. 2021), one sequence.

    ``landmarks`` segment means of the queries and keys stand in for the n x n softmax; its
    middle factor is inverted with the iterative Moore-Penrose scheme; a depthwise convolution of
    the values along the sequence is added (as Nyströmformer does). Sequences no longer than
    ``landmarks`` use exact attention: the approximation would be no cheaper.
    """

    RESIDUAL_KERNEL = 33

    def __init__(self, dim: int, *, heads: int, landmarks: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_dim {dim} is not divisible by heads {heads}")
        self.heads, self.landmarks = heads, landmarks
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        kernel = self.RESIDUAL_KERNEL
        self.residual = nn.Conv2d(heads, heads, (kernel, 1), padding=(kernel // 2, 0), groups=heads, bias=False)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, 3, self.heads, dim // self.heads).permute(1, 2, 0, 3)  # 3 x (h, n, d)
        return q * q.shape[-1] ** -0.5, k, v

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._qkv(x)
        if x.shape[0] <= self.landmarks:
            mixed = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        else:
            mixed = _nystrom_mix(q, k, v, landmarks=self.landmarks)
        mixed = mixed + self.residual(v[None])[0]
        return self.out(mixed.permute(1, 0, 2).reshape(x.shape[0], -1))

    def query_attention(self, x: Tensor, *, row: int) -> Tensor:
        """Exact softmax attention of token ``row`` over all tokens (n,), averaged over heads."""
        q, k, _ = self._qkv(x)
        return torch.softmax(q[:, row : row + 1] @ k.transpose(-1, -2), dim=-1)[:, 0].mean(dim=0)


def _nystrom_mix(q: Tensor, k: Tensor, v: Tensor, *, landmarks: int, pinv_iterations: int = 6) -> Tensor:
    """softmax(q k^T) v, approximated through ``landmarks`` segment means of q and k (h, n, d).

    Exact for landmarks == n (segments of one token) once the pseudo-inverse has converged; the
    6 iterations of Nyströmformer are enough for the smooth kernels of segment means.
    """
    n = q.shape[1]
    segment = torch.arange(n, device=q.device) * landmarks // n  # near-equal contiguous segments
    q_mark, k_mark = _segment_means(q, segment, landmarks), _segment_means(k, segment, landmarks)
    kernel_1 = torch.softmax(q @ k_mark.transpose(-1, -2), dim=-1)
    kernel_2 = torch.softmax(q_mark @ k_mark.transpose(-1, -2), dim=-1)
    kernel_3 = torch.softmax(q_mark @ k.transpose(-1, -2), dim=-1)
    return kernel_1 @ (_iterative_pinv(kernel_2, pinv_iterations) @ (kernel_3 @ v))


def _segment_means(x: Tensor, segment: Tensor, count: int) -> Tensor:
    """(h, n, d) -> (h, count, d): the mean of x over each segment of the sequence."""
    sums = x.new_zeros(x.shape[0], count, x.shape[2]).index_add_(1, segment, x)
    sizes = torch.bincount(segment, minlength=count).to(x.dtype)
    return sums / sizes[None, :, None]


def _iterative_pinv(matrix: Tensor, iterations: int) -> Tensor:
    """Moore-Penrose pseudo-inverse of softmax kernels (h, m, m), Razavi et al.'s iteration."""
    identity = torch.eye(matrix.shape[-1], device=matrix.device, dtype=matrix.dtype)
    absolute = matrix.abs()
    scale = absolute.sum(dim=-1).amax() * absolute.sum(dim=-2).amax()
    z = matrix.transpose(-1, -2) / scale
    for _ in range(iterations):
        xz = matrix @ z
        z = 0.25 * z @ (13 * identity - xz @ (15 * identity - xz @ (7 * identity - xz)))
    return z


class TransMIL(MILModel):
    """TransMIL (Shao et al. 2021): Nyström transformer layers with a pyramid position encoding.

    Tiles are embedded, padded to a square number by repeating the first ones, given a class
    token, then: layer, PPEG (depthwise 7/5/3 convolutions over the square grid), layer, norm;
    the class token is classified. Not permutation invariant: the PPEG sees tile order, which is
    the tiles store's (row-major) order.
    """

    def __init__(
        self, *, in_dim: int, n_classes: int, hidden_dim: int = 128, heads: int = 4, dropout: float = 0.1
    ) -> None:
        super().__init__(
            in_dim=in_dim, n_classes=n_classes, hparams={"hidden_dim": hidden_dim, "heads": heads, "dropout": dropout}
        )
        landmarks = max(1, hidden_dim // 2)  # the paper's choice (256 for 512-d)
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.zeros(1, hidden_dim))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in range(3))
        self.layers = nn.ModuleList(
            NystromAttention(hidden_dim, heads=heads, landmarks=landmarks, dropout=dropout) for _ in range(2)
        )
        self.position = nn.ModuleList(
            nn.Conv2d(hidden_dim, hidden_dim, size, padding=size // 2, groups=hidden_dim) for size in (7, 5, 3)
        )
        self.classifier = nn.Linear(hidden_dim, n_classes)
        nn.init.normal_(self.cls_token, std=1e-6)  # tiny but not zero: the layers must tell it apart

    def _ppeg(self, tokens: Tensor, side: int) -> Tensor:
        cls, grid = tokens[:1], tokens[1:].T.reshape(1, -1, side, side)
        grid = grid + sum(conv(grid) for conv in self.position)
        return torch.cat([cls, grid.reshape(tokens.shape[1], -1).T])

    def bag_forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        n = features.shape[0]
        side = math.isqrt(n - 1) + 1  # ceil(sqrt(n))
        padded = torch.arange(side * side, device=features.device) % n  # wraps around onto the first tiles
        tokens = torch.cat([self.cls_token, self.embed(features)[padded]])
        normed = self.norms[0](tokens)
        weights = self.layers[0].query_attention(normed, row=0)[1:]
        tokens = tokens + self.layers[0](normed)
        tokens = self._ppeg(tokens, side)
        tokens = tokens + self.layers[1](self.norms[1](tokens))
        logits = self.classifier(self.norms[2](tokens[0]))
        tile_weights = torch.zeros(n, device=features.device, dtype=weights.dtype).index_add_(0, padded, weights)
        return logits, tile_weights / tile_weights.sum()


MIL_MODELS: dict[str, type[MILModel]] = {
    "abmil": GatedABMIL,
    "clam_sb": CLAMSB,
    "dsmil": DSMIL,
    "transmil": TransMIL,
    "max": MaxPool,
    "mean": MeanPool,
}


def build_mil_model(name: str, *, in_dim: int, n_classes: int, **hparams: Any) -> MILModel:
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
