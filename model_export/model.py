"""The FedCart model in numpy: the reference the ONNX graphs are tested against.

Parameters (DESIGN.md section 2): ``e_in`` (V x d), ``e_out`` (V x d), ``bias`` (V) and
``blend`` (3), the weights of the on-device history features. For a batch of carts (item ids
padded with -1) and each user's history (distinct item ids with recency-weighted counts
h > 0 and personal co-occurrence with the cart c >= 0, see features.py; padded with -1):

    u      = sum of e_in rows of the cart's n items / sqrt(n) (0 for an empty cart)
    s_j    = e_out[j] . u + bias_j
             + [j in history] (blend_0 log(1 + h_j) + blend_1 + blend_2 log(1 + c_j))

The blend touches only the H history entries, not the whole catalog. Pooling by sqrt(n)
rather than the mean lets a large cart score more sharply than a small one (EASE and
co-occurrence sum over the cart): on UCI its best test HitRate@10 over the settings tried was
0.323 (d 128), mean pooling's 0.303.

Training: softmax cross-entropy of the held-out target over the whole catalog, mean over the
batch. The gradients are closed-form; ``e_in``'s is sparse (only cart rows).
Only numpy: a device imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import DTypeLike

__all__ = [
    "N_BLEND",
    "PAD",
    "TENSOR_NAMES",
    "Weights",
    "history_features",
    "init_weights",
    "loss_and_grads",
    "n_parameters",
    "scores",
    "sgd_step",
]

PAD = -1
TENSOR_NAMES = ("e_in", "e_out", "bias", "blend")
N_BLEND = 3  # history features: log(1 + h), "in history", log(1 + co)


@dataclass
class Weights:
    """Model parameters; float32 unless a test asks for float64."""

    e_in: np.ndarray
    e_out: np.ndarray
    bias: np.ndarray
    blend: np.ndarray

    @property
    def n_items(self) -> int:
        return int(self.e_in.shape[0])

    @property
    def dim(self) -> int:
        return int(self.e_in.shape[1])

    def tensors(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in TENSOR_NAMES}

    def flat(self) -> np.ndarray:
        """All parameters as one float32 vector (the order of TENSOR_NAMES)."""
        return np.concatenate([t.ravel() for t in self.tensors().values()]).astype(np.float32)

    @classmethod
    def from_flat(cls, flat: np.ndarray, n_items: int, dim: int) -> Weights:
        sizes = [n_items * dim, n_items * dim, n_items, N_BLEND]
        if flat.shape != (n_parameters(n_items, dim),):
            raise ValueError(f"flat weights have shape {flat.shape}, expected ({sum(sizes)},)")
        parts = np.split(flat, np.cumsum(sizes)[:-1])
        return cls(parts[0].reshape(n_items, dim), parts[1].reshape(n_items, dim),
                   parts[2], parts[3])

    def astype(self, dtype: type) -> Weights:
        return Weights(*(t.astype(dtype) for t in self.tensors().values()))


def n_parameters(n_items: int, dim: int) -> int:
    """The length of the flat weight vector (what a device uploads per round)."""
    return 2 * n_items * dim + n_items + N_BLEND


def init_weights(n_items: int, dim: int, rng: np.random.Generator, scale: float = 0.1,
                 popularity: np.ndarray | None = None) -> Weights:
    """Small random embeddings; the bias starts at log-popularity when it is given (the
    softmax's optimum for an empty cart), so training starts from the popularity ranking."""
    bias = np.zeros(n_items, np.float32)
    if popularity is not None:
        bias = np.log(np.asarray(popularity, np.float64) + 1.0).astype(np.float32)
    return Weights(
        e_in=(rng.standard_normal((n_items, dim)) * scale).astype(np.float32),
        e_out=(rng.standard_normal((n_items, dim)) * scale).astype(np.float32),
        bias=bias,
        blend=np.zeros(N_BLEND, np.float32),
    )


def history_features(hist_ids: np.ndarray, hist_w: np.ndarray, hist_co: np.ndarray,
                     n_items: int, dtype: DTypeLike = np.float32) -> np.ndarray:
    """Dense per-item features [N_BLEND, B, V] (log(1 + h), [in history], log(1 + co)) of
    padded history ids (distinct within a row), counts and co-occurrences."""
    valid = hist_ids >= 0
    rows = np.nonzero(valid)[0]
    features: np.ndarray = np.zeros((N_BLEND, hist_ids.shape[0], n_items), dtype=dtype)
    features[0, rows, hist_ids[valid]] = np.log1p(hist_w[valid].astype(dtype))
    features[1, rows, hist_ids[valid]] = 1.0
    features[2, rows, hist_ids[valid]] = np.log1p(hist_co[valid].astype(dtype))
    return features


def _cart_vector(w: Weights, ctx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, mask, sqrt(n)) for padded carts."""
    mask = (ctx >= 0).astype(w.e_in.dtype)
    n = np.sqrt(np.maximum(mask.sum(axis=1, keepdims=True), 1.0))
    rows = w.e_in[np.where(ctx >= 0, ctx, 0)] * mask[..., None]
    return rows.sum(axis=1) / n, mask, n


def scores(w: Weights, ctx: np.ndarray, hist_ids: np.ndarray, hist_w: np.ndarray,
           hist_co: np.ndarray) -> np.ndarray:
    """Scores of every catalog item, [B, V] (cart items not yet excluded)."""
    u, _, _ = _cart_vector(w, ctx)
    features = history_features(hist_ids, hist_w, hist_co, w.n_items, w.e_in.dtype)
    return u @ w.e_out.T + w.bias + np.tensordot(w.blend, features, axes=1)


def loss_and_grads(w: Weights, ctx: np.ndarray, hist_ids: np.ndarray, hist_w: np.ndarray,
                   hist_co: np.ndarray, targets: np.ndarray) -> tuple[float, Weights]:
    """Mean softmax cross-entropy and its exact gradient with respect to every parameter."""
    u, mask, n = _cart_vector(w, ctx)
    features = history_features(hist_ids, hist_w, hist_co, w.n_items, w.e_in.dtype)
    logits = u @ w.e_out.T + w.bias + np.tensordot(w.blend, features, axes=1)
    top = logits.max(axis=1, keepdims=True)
    lse = top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    batch = np.arange(len(targets))
    loss = float((lse[:, 0] - logits[batch, targets]).mean())

    g = np.exp(logits - lse)
    g[batch, targets] -= 1.0
    g /= len(targets)
    g_u = g @ w.e_out
    g_in = np.zeros_like(w.e_in)
    per_row = (g_u / n)[:, None, :] * mask[..., None]
    np.add.at(g_in, np.where(ctx >= 0, ctx, 0), per_row)
    grads = Weights(
        e_in=g_in,
        e_out=g.T @ u,
        bias=g.sum(axis=0),
        blend=(features * g).sum(axis=(1, 2)).astype(w.blend.dtype),
    )
    return loss, grads


def sgd_step(w: Weights, ctx: np.ndarray, hist_ids: np.ndarray, hist_w: np.ndarray,
             hist_co: np.ndarray, targets: np.ndarray, lr: np.ndarray) -> tuple[float, Weights]:
    """One SGD step with a learning rate per parameter group (the order of TENSOR_NAMES):
    what train_step.onnx computes. The groups' gradients differ by orders of magnitude (a
    context row's is divided by the cart size, the blend's sums over the whole catalog)."""
    loss, g = loss_and_grads(w, ctx, hist_ids, hist_w, hist_co, targets)
    return loss, Weights(*(p - rate * q for p, q, rate in zip(
        w.tensors().values(), g.tensors().values(), lr, strict=True)))
