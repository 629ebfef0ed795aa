"""Export: weights -> ONNX and ORT graphs -> a signed bundle. Needs ``onnx`` (server side)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import nacl.signing
import onnx

from fedcart.model_export.bundle import Manifest, write_bundle
from fedcart.model_export.graphs import convert_to_ort, recommend_graph, train_step_graph
from fedcart.model_export.model import Neighbours, Weights

__all__ = ["build_graphs", "export_bundle"]


def build_graphs(n_items: int, dim: int) -> dict[str, bytes]:
    """recommend and train_step as .onnx and as .ort (ONNX Runtime Mobile). They hold no
    weights: one build serves every model version of a catalog and dimension."""
    models = {"recommend": recommend_graph(n_items, dim),
              "train_step": train_step_graph(n_items, dim)}
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="fedcart-export-") as tmp:
        for stem, model in models.items():
            path = Path(tmp) / f"{stem}.onnx"
            onnx.save(model, path)
            out[f"{stem}.onnx"] = path.read_bytes()
            out[f"{stem}.ort"] = convert_to_ort(path).read_bytes()
    return out


def export_bundle(out_dir: Path | str, weights: Weights, items: Sequence[str],
                  names: Sequence[str], signing_key: nacl.signing.SigningKey, *,
                  neighbours: Neighbours | None = None, model_version: int = 0,
                  round_id: int = 0, history_decay: float = 1.0,
                  graphs: Mapping[str, bytes] | None = None) -> Manifest:
    """Write ``weights`` (and the item-item table; none by default) as a signed bundle,
    with ``graphs`` from an earlier bundle of the same V and d, or freshly built."""
    if graphs is None:
        graphs = build_graphs(weights.n_items, weights.dim)
    if neighbours is None:
        neighbours = Neighbours.empty(weights.n_items)
    return write_bundle(out_dir, weights=weights, neighbours=neighbours, items=items,
                        names=names,
                        graphs=graphs, model_version=model_version,
                        round_id=round_id, history_decay=history_decay,
                        signing_key=signing_key)
