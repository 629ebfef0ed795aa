"""The FedCart model in numpy: the reference the ONNX graphs are tested against.

Parameters (DESIGN.md section 2): ``e_in`` (V x d), ``e_out`` (V x d), ``bias`` (V) and
``blend`` (4): the weights of the on-device history features and of the item-item term.
d = 0 is a model size of its own: the embeddings are empty ([V, 0]), so the embedding term
below is 0 and the graphs neither take them nor form the V x d product (model_tensors). The
federated defaults never train the embeddings, and a zero ``e_out`` (see init_weights) makes
their term exactly 0 anyway: d = 0 is that model without the download and the product.
Beside them, not trained: the item-item table ``N`` (:class:`Neighbours`: for each item up to K
neighbours with weights), derived by the aggregator from a secure, DP-noised sum of the
devices' co-occurrence statistics (statistics.py, item_item.py). For a batch of carts (item ids
padded with -1) and each user's history (distinct item ids with recency-weighted counts
h > 0 and personal co-occurrence with the cart c >= 0, see features.py; padded with -1):

    u      = sum of e_in rows of the cart's n items / sqrt(n) (0 for an empty cart)
    s_j    = e_out[j] . u + bias_j + blend_3 sum over cart items i of N[i, j]
             + [j in history] (blend_0 log(1 + h_j) + blend_1 + blend_2 log(1 + c_j))

The blend touches only the H history entries and the cart's K neighbours each, not the whole
catalog. Pooling by sqrt(n) rather than the mean lets a large cart score more sharply than a
small one (EASE and co-occurrence sum over the cart): on UCI its best test HitRate@10 over the
settings tried was 0.323 (d 128), mean pooling's 0.303. The item-item term is full rank where
the embeddings are rank d: it is what carries EASE's strength into the model.

Training: softmax cross-entropy of the held-out target over the whole catalog, mean over the
batch. The gradients are closed-form; ``e_in``'s is sparse (only cart rows).
Only numpy: a device imports this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import DTypeLike

__all__ = [
    "EMBEDDINGS",
    "HISTORY_DECAY",
    "ITEM_ITEM",
    "N_BLEND",
    "PAD",
    "TENSOR_NAMES",
    "Neighbours",
    "Weights",
    "group_size",
    "history_features",
    "init_weights",
    "largest_per_row",
    "learning_rates",
    "loss_and_grads",
    "mean_row_max",
    "model_tensors",
    "n_parameters",
    "pick",
    "place",
    "scores",
    "sgd_step",
    "trained_groups",
]

PAD = -1
TENSOR_NAMES = ("e_in", "e_out", "bias", "blend")
EMBEDDINGS = TENSOR_NAMES[:2]  # the groups a model of d = 0 does not have
N_BLEND = 4  # log(1 + h), "in history", log(1 + co) (history features); item-item term
ITEM_ITEM = 3  # the blend weight of the item-item term
# a basket k baskets before the newest counts decay^k in the history features (features.py);
# every bundle's manifest carries it, so devices and the evaluator weigh history alike
HISTORY_DECAY = 0.9


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


def mean_row_max(weights: np.ndarray) -> float:
    """The mean of the positive row maxima of a table's weights (1 for an empty table): the
    scale that puts every item-item table on the same footing for its blend weight."""
    row_max = weights.max(axis=1)
    return float(row_max[row_max > 0].mean()) if np.any(row_max > 0) else 1.0


def largest_per_row(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(columns, values) of each row's ``k`` largest entries, in no particular order, with
    entries that are not positive read as 0: how every item-item table keeps its K."""
    top = np.argpartition(-values, k - 1, axis=1)[:, :k]
    kept = np.take_along_axis(values, top, axis=1)
    return top, np.where(kept > 0, kept, 0.0).astype(values.dtype)


@dataclass(frozen=True)
class Neighbours:
    """The item-item table: row i lists K item ids and the weight each gets when item i is
    in the cart (rows padded with weight 0). Not trained: it changes only when the aggregator
    derives it anew from a co-occurrence statistic."""

    ids: np.ndarray  # int64 [V, K]
    weights: np.ndarray  # float32 [V, K]

    def __post_init__(self) -> None:
        if self.ids.ndim != 2 or self.ids.shape != self.weights.shape or self.ids.shape[1] < 1:
            raise ValueError(f"a neighbour table has ids and weights of one shape [V, K >= 1], "
                             f"got {self.ids.shape} and {self.weights.shape}")
        if self.ids.size and (self.ids.min() < 0 or self.ids.max() >= self.ids.shape[0]):
            raise ValueError(f"neighbour ids must lie in [0, {self.ids.shape[0]})")

    @classmethod
    def empty(cls, n_items: int) -> Neighbours:
        """No item-item term yet (one zero-weight entry per row keeps the graphs' shapes)."""
        return cls(np.zeros((n_items, 1), np.int64), np.zeros((n_items, 1), np.float32))

    @property
    def n_items(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def tensors(self) -> dict[str, np.ndarray]:
        """The graphs' table inputs, contiguous and of their dtypes (no copy if they are)."""
        return {"nbr_ids": np.ascontiguousarray(self.ids, np.int64),
                "nbr_w": np.ascontiguousarray(self.weights, np.float32)}

    def to_bytes(self) -> bytes:
        """The rows that have a neighbour, little-endian: their count R (uint32), their ids
        (int32, ascending), then ids [R, K] (int32) and weights [R, K] (float32). Items outside
        the co-occurrence head have a row only where their names share a word, so storing all
        V rows would mostly store zeros (11 MB instead of 1.6 MB for Instacart's 13,880
        items)."""
        rows = np.flatnonzero(np.any(self.weights != 0, axis=1))
        return b"".join([np.array([len(rows)], "<u4").tobytes(), rows.astype("<i4").tobytes(),
                         self.ids[rows].astype("<i4").tobytes(),
                         self.weights[rows].astype("<f4").tobytes()])

    @classmethod
    def from_bytes(cls, raw: bytes, n_items: int, k: int) -> Neighbours:
        """The table ``to_bytes`` wrote; ValueError if ``raw`` is not one of [V, K]."""
        if len(raw) < 4:
            raise ValueError("a neighbour table starts with its row count")
        count = int(np.frombuffer(raw[:4], "<u4")[0])
        if count > n_items or len(raw) != 4 + 4 * count + 8 * count * k:
            raise ValueError(f"{len(raw)} bytes are not a table of {count} rows of K = {k} "
                             f"over {n_items} items")
        rows = np.frombuffer(raw[4:4 + 4 * count], "<i4").astype(np.int64)
        if count and (rows[0] < 0 or rows[-1] >= n_items or np.any(np.diff(rows) <= 0)):
            raise ValueError(f"table rows must be ascending ids in [0, {n_items})")
        body = 4 + 4 * count
        ids = np.zeros((n_items, k), np.int64)
        weights = np.zeros((n_items, k), np.float32)
        ids[rows] = np.frombuffer(raw[body:body + 4 * count * k], "<i4").reshape(count, k)
        weights[rows] = np.frombuffer(raw[body + 4 * count * k:], "<f4").reshape(count, k)
        return cls(ids, weights)

    def scores(self, ctx: np.ndarray, dtype: DTypeLike = np.float32) -> np.ndarray:
        """sum over each padded cart's items i of N[i, :], dense [B, V] (the reference)."""
        out: np.ndarray = np.zeros((ctx.shape[0], self.n_items), dtype=dtype)
        rows, cols = np.nonzero(ctx >= 0)
        items = ctx[rows, cols]
        np.add.at(out, (np.repeat(rows, self.k), self.ids[items].ravel()),
                  self.weights[items].ravel().astype(dtype))
        return out


def n_parameters(n_items: int, dim: int) -> int:
    """The length of the flat weight vector (V + 4 with d = 0)."""
    return 2 * n_items * dim + n_items + N_BLEND


def model_tensors(dim: int) -> tuple[str, ...]:
    """The parameter groups a model of dimension ``dim`` feeds to and gets back from its
    graphs, in TENSOR_NAMES order: all of them, or with d = 0 the bias and blend only (the
    flat vector still lists the empty embeddings, at no length)."""
    if dim < 0:
        raise ValueError(f"the embedding dimension must be at least 0, got {dim}")
    return TENSOR_NAMES if dim else tuple(n for n in TENSOR_NAMES if n not in EMBEDDINGS)


def learning_rates(embeddings: float, bias: float,
                   blend: float) -> tuple[float, float, float, float]:
    """One SGD learning rate per tensor of TENSOR_NAMES (what train_step takes): e_in and
    e_out share the embeddings' rate."""
    return (embeddings, embeddings, bias, blend)


def trained_groups(groups: Sequence[str], dim: int | None = None) -> tuple[str, ...]:
    """``groups`` checked (known, at least one, and with ``dim`` given, groups a model of
    that dimension has: d = 0 has no embeddings to train) and in TENSOR_NAMES order."""
    unknown = set(groups) - set(TENSOR_NAMES)
    if unknown or not groups:
        raise ValueError(f"trained groups must be a non-empty subset of {TENSOR_NAMES}, got "
                         f"{list(groups)}")
    if dim is not None:
        absent = [n for n in TENSOR_NAMES if n in groups and n not in model_tensors(dim)]
        if absent:
            raise ValueError(f"a model of d = {dim} has no {' or '.join(absent)} to train: "
                             f"train a subset of {list(model_tensors(dim))}")
    return tuple(n for n in TENSOR_NAMES if n in groups)


def _group_slices(n_items: int, dim: int, groups: Sequence[str]) -> list[slice]:
    sizes = {"e_in": n_items * dim, "e_out": n_items * dim, "bias": n_items, "blend": N_BLEND}
    ends = dict(zip(TENSOR_NAMES, np.cumsum([sizes[n] for n in TENSOR_NAMES]), strict=True))
    return [slice(int(ends[n] - sizes[n]), int(ends[n])) for n in trained_groups(groups, dim)]


def group_size(groups: Sequence[str], n_items: int, dim: int) -> int:
    """How many parameters ``groups`` hold: the length of a round's update."""
    return sum(s.stop - s.start for s in _group_slices(n_items, dim, groups))


def pick(flat: np.ndarray, groups: Sequence[str], n_items: int, dim: int) -> np.ndarray:
    """The entries of ``groups`` in a flat weight vector: what a device uploads when only
    those groups are trained (under DP, the blend alone: 4 numbers instead of 2Vd)."""
    return np.concatenate([flat[s] for s in _group_slices(n_items, dim, groups)])


def place(values: np.ndarray, groups: Sequence[str], n_items: int, dim: int) -> np.ndarray:
    """The inverse of :func:`pick`: a flat vector with ``values`` at ``groups``, 0 elsewhere."""
    slices = _group_slices(n_items, dim, groups)
    expected = group_size(groups, n_items, dim)
    if values.shape != (expected,):
        raise ValueError(f"{values.shape} values for groups {list(groups)}, expected "
                         f"({expected},)")
    out = np.zeros(n_parameters(n_items, dim), dtype=values.dtype)
    at = 0
    for s in slices:
        out[s] = values[at:at + s.stop - s.start]
        at += s.stop - s.start
    return out


INITIAL_BLEND = (1.0, 1.0, 1.0, 1.0)


def init_weights(n_items: int, dim: int, rng: np.random.Generator, scale: float = 0.1,
                 popularity: np.ndarray | None = None) -> Weights:
    """Small random ``e_in`` and a zero ``e_out`` (as LoRA starts one factor at zero): the
    embedding term starts at exactly 0, so until it is trained (and wherever it is frozen,
    as under DP) it adds no noise to the scores, while its gradient is not zero. With
    ``dim`` 0 both are empty and draw nothing from ``rng``. The bias
    starts at log-popularity when it is given. The blend starts at INITIAL_BLEND rather than
    0, so that before anything is learned a device already ranks its user's own past items
    and the cart's neighbours first (on UCI under DP at epsilon 8, HitRate@10 0.19 instead
    of 0.01 after 10 rounds)."""
    bias = np.zeros(n_items, np.float32)
    if popularity is not None:
        bias = np.log(np.asarray(popularity, np.float64) + 1.0).astype(np.float32)
    return Weights(
        e_in=(rng.standard_normal((n_items, dim)) * scale).astype(np.float32),
        e_out=np.zeros((n_items, dim), np.float32),
        bias=bias,
        blend=np.array(INITIAL_BLEND, np.float32),
    )


def history_features(hist_ids: np.ndarray, hist_w: np.ndarray, hist_co: np.ndarray,
                     n_items: int, dtype: DTypeLike = np.float32) -> np.ndarray:
    """Dense per-item history features [3, B, V] (log(1 + h), [in history], log(1 + co)) of
    padded history ids (distinct within a row), counts and co-occurrences."""
    valid = hist_ids >= 0
    rows = np.nonzero(valid)[0]
    features: np.ndarray = np.zeros((ITEM_ITEM, hist_ids.shape[0], n_items), dtype=dtype)
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


def _features(w: Weights, nbrs: Neighbours, ctx: np.ndarray, hist_ids: np.ndarray,
              hist_w: np.ndarray, hist_co: np.ndarray) -> np.ndarray:
    """The blend's N_BLEND dense features [N_BLEND, B, V]."""
    dtype = w.e_in.dtype
    history = history_features(hist_ids, hist_w, hist_co, w.n_items, dtype)
    return np.concatenate([history, nbrs.scores(ctx, dtype)[None]])


def scores(w: Weights, nbrs: Neighbours, ctx: np.ndarray, hist_ids: np.ndarray,
           hist_w: np.ndarray, hist_co: np.ndarray) -> np.ndarray:
    """Scores of every catalog item, [B, V] (cart items not yet excluded)."""
    u, _, _ = _cart_vector(w, ctx)
    features = _features(w, nbrs, ctx, hist_ids, hist_w, hist_co)
    return u @ w.e_out.T + w.bias + np.tensordot(w.blend, features, axes=1)


def loss_and_grads(w: Weights, nbrs: Neighbours, ctx: np.ndarray, hist_ids: np.ndarray,
                   hist_w: np.ndarray, hist_co: np.ndarray,
                   targets: np.ndarray) -> tuple[float, Weights]:
    """Mean softmax cross-entropy and its exact gradient with respect to every parameter."""
    u, mask, n = _cart_vector(w, ctx)
    features = _features(w, nbrs, ctx, hist_ids, hist_w, hist_co)
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


def sgd_step(w: Weights, nbrs: Neighbours, ctx: np.ndarray, hist_ids: np.ndarray,
             hist_w: np.ndarray, hist_co: np.ndarray, targets: np.ndarray,
             lr: np.ndarray) -> tuple[float, Weights]:
    """One SGD step with a learning rate per parameter group (the order of TENSOR_NAMES):
    what train_step.onnx computes. The groups' gradients differ by orders of magnitude (a
    context row's is divided by the cart size, the blend's sums over the whole catalog)."""
    loss, g = loss_and_grads(w, nbrs, ctx, hist_ids, hist_w, hist_co, targets)
    return loss, Weights(*(p - rate * q for p, q, rate in zip(
        w.tensors().values(), g.tensors().values(), lr, strict=True)))
