"""The model as ONNX graphs, built op by op with ``onnx.helper`` (opset 18).

``recommend.onnx``: inputs the weights ``e_in``, ``e_out``, ``bias``, ``blend`` (with d = 0
only the last two, see below), the item-item table ``nbr_ids`` int64[V, K] and ``nbr_w``
float32[V, K], then ``cart`` int64[B, L] and ``hist_ids`` int64[B, H] (both padded with -1;
history ids distinct within a row), ``hist_w`` and ``hist_co`` float32[B, H], ``k``
int64[1]; outputs ``top_ids`` int64[B, k'] and ``top_scores`` float32[B, k'] with
k' = min(k, V). Cart items score -inf, so they are never recommended ahead of any other item.

``train_step.onnx``: weights and table as inputs, plus ``ctx``, ``hist_ids``, ``hist_w``,
``hist_co``, ``targets`` int64[B] and ``lr`` float32[4]; outputs ``loss`` and the weights after
one SGD step. The backward pass is closed-form (see model.py) and never forms the dense
one-hot: ``e_in`` is updated with a ScatterND-add over the context rows only, ``e_out`` with
one Gemm plus a ScatterND-add on the target rows. The item-item term is scattered from the
cart's [B, L K] neighbour entries straight into the logits, and its blend gradient is read
back at those entries: no dense [B, V] item-item tensor exists in either graph.

With d = 0 (model.model_tensors) neither graph has ``e_in`` or ``e_out``, as inputs or as
outputs: the logits start from the bias broadcast over the batch, with no V x d product, and
the train step updates the bias and blend only (``lr`` keeps its four entries; the
embeddings' two go unused).

Both graphs share :func:`_scores`, so the score the device ranks by is the score it trains.
Neither graph holds weights: they depend only on (V, d), so a new model version is one
``weights.bin`` and a device downloads the graphs once. Baked-in initializers would let
onnxruntime pre-pack ``e_out`` (about 10% faster top-k at V = 50,000), but every round would
then ship the weights again inside ``recommend.ort``.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fedcart.model_export.model import ITEM_ITEM, N_BLEND, TENSOR_NAMES, model_tensors

__all__ = ["OPSET", "convert_to_ort", "recommend_graph", "train_step_graph"]

OPSET = 18
FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64


class _Graph:
    """A tiny helper: each call adds one node and returns its output name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._consts: dict[str, np.ndarray] = {}
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        """A named initializer, added where a graph first needs it (one that no node reads
        makes the ORT converter warn); asking again for the same name and value reuses it."""
        value = np.asarray(value)
        if name in self._consts:
            if not np.array_equal(self._consts[name], value):
                raise ValueError(f"constant {name} is already defined with another value")
            return name
        self._consts[name] = value
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        self._count += 1
        name = out or f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name],
                                           name=f"n{self._count}_{op_type}", **attrs))
        return name

    def model(self, name: str, inputs: list[onnx.ValueInfoProto],
              outputs: list[onnx.ValueInfoProto], doc: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="fedcart", doc_string=doc)
        model.ir_version = 9
        onnx.checker.check_model(model, full_check=True)
        return model


def _common_consts(g: _Graph) -> None:
    g.const("zero_i", np.array(0, np.int64))
    g.const("start0", np.array([0], np.int64))
    g.const("end1", np.array([1], np.int64))
    g.const("minus_one", np.array([-1], np.int64))
    g.const("one_f", np.array(1.0, np.float32))
    g.const("axis_last", np.array([-1], np.int64))


def _blend_weight(g: _Graph, index: int) -> str:
    return g.op("Gather", "blend", g.const(f"blend_{index}", np.array(index, np.int64)), axis=0)


def _scores(g: _Graph, ctx: str, n_items: int, dim: int) -> dict[str, str]:
    """Forward pass shared by both graphs (weights, table and history under their input
    names); returns the names of its intermediate values (``u`` and ``count`` only with
    d > 0)."""
    valid = g.op("GreaterOrEqual", ctx, "zero_i")
    safe_ctx = g.op("Where", valid, ctx, "zero_i")
    mask = g.op("Cast", valid, to=FLOAT)
    batch = g.op("Slice", g.op("Shape", ctx), "start0", "end1")
    embedding: dict[str, str] = {}
    if dim:
        g.const("axis1", np.array([1], np.int64))
        count = g.op("Sqrt", g.op("Max", g.op("ReduceSum", mask, "axis1", keepdims=1),
                                  "one_f"))
        rows = g.op("Gather", "e_in", safe_ctx, axis=0)
        weights = g.op("Unsqueeze", g.op("Div", mask, count), "axis_last")
        u = g.op("ReduceSum", g.op("Mul", rows, weights), "axis1", keepdims=0)
        base = g.op("Gemm", u, "e_out", "bias", transB=1)
        embedding = {"u": u, "count": count}
    else:
        logits_shape = g.op("Concat", batch, g.const("n_items", np.array([n_items], np.int64)),
                            axis=0)
        base = g.op("Expand", "bias", logits_shape)

    # The item-item term: each cart item's K neighbour entries, [B, L K], scattered (added)
    # into the logits with the blend weight applied on that small side.
    per_row = g.op("Concat", batch, "minus_one", axis=0)
    nbr_ids = g.op("Reshape", g.op("Gather", "nbr_ids", safe_ctx, axis=0), per_row)
    nbr_w = g.op("Reshape", g.op("Mul", g.op("Gather", "nbr_w", safe_ctx, axis=0),
                                 g.op("Unsqueeze", mask, "axis_last")), per_row)
    base = g.op("ScatterElements", base, nbr_ids,
                g.op("Mul", nbr_w, _blend_weight(g, ITEM_ITEM)), axis=1, reduction="add")

    # The blend, on the H history entries only (ids are distinct within a row):
    # the three history features (log(1 + h), [in history], log(1 + co)), each [B, H], dotted
    # with their blend weights by elementwise ops: a [B, H, 3] MatMul and its axis-(0, 1)
    # ReduceSum made the whole train step 2.6x slower at V = 169.
    h_valid = g.op("GreaterOrEqual", "hist_ids", "zero_i")
    safe_hist = g.op("Where", h_valid, "hist_ids", "zero_i")
    f_any = g.op("Cast", h_valid, to=FLOAT)
    f_log = g.op("Mul", g.op("Log", g.op("Add", "hist_w", "one_f")), f_any)
    f_co = g.op("Mul", g.op("Log", g.op("Add", "hist_co", "one_f")), f_any)
    features = (f_log, f_any, f_co)
    weighted = [g.op("Mul", f, _blend_weight(g, i)) for i, f in enumerate(features)]
    logits = g.op("ScatterElements", base, safe_hist,
                  g.op("Sum", *weighted), axis=1, reduction="add")
    return {"valid": valid, "safe_ctx": safe_ctx, "mask": mask, **embedding,
            "safe_hist": safe_hist, "f_log": f_log, "f_any": f_any, "f_co": f_co,
            "nbr_ids": nbr_ids, "nbr_w": nbr_w, "logits": logits}


def _io(name: str, elem: int, shape: list[str | int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _history_inputs() -> list[onnx.ValueInfoProto]:
    return [_io("hist_ids", INT64, ["B", "H"]), _io("hist_w", FLOAT, ["B", "H"]),
            _io("hist_co", FLOAT, ["B", "H"])]


def _weight_shapes(n_items: int, dim: int) -> dict[str, list[str | int]]:
    """The shapes of the weights a model of (V, d) feeds its graphs (model_tensors)."""
    shapes: dict[str, list[str | int]] = {"e_in": [n_items, dim], "e_out": [n_items, dim],
                                          "bias": [n_items], "blend": [N_BLEND]}
    return {name: shapes[name] for name in model_tensors(dim)}


def _weight_inputs(n_items: int, dim: int) -> list[onnx.ValueInfoProto]:
    """The trained weights, then the item-item table (K varies with the table)."""
    return [*(_io(n, FLOAT, s) for n, s in _weight_shapes(n_items, dim).items()),
            _io("nbr_ids", INT64, [n_items, "K_nbr"]), _io("nbr_w", FLOAT, [n_items, "K_nbr"])]


def recommend_graph(n_items: int, dim: int) -> onnx.ModelProto:
    """Top-k recommendation, and every item's score (``scores``, cart items -inf: what an
    evaluation ranks the hidden item in); the weights are inputs."""
    g = _Graph()
    _common_consts(g)
    g.const("n_items", np.array([n_items], np.int64))
    g.const("neg_inf", np.array(-np.inf, np.float32))
    g.const("pos_inf", np.array(np.inf, np.float32))
    s = _scores(g, "cart", n_items, dim)
    exclusion = g.op("Where", s["valid"], "neg_inf", "pos_inf")
    ranked = g.op("ScatterElements", s["logits"], s["safe_ctx"], exclusion, axis=1,
                  reduction="min", out="scores")
    k = g.op("Min", "k", "n_items")
    g.nodes.append(helper.make_node("TopK", [ranked, k], ["top_scores", "top_ids"],
                                    name="topk", axis=1, largest=1, sorted=1))
    return g.model(
        "fedcart_recommend",
        [*_weight_inputs(n_items, dim), _io("cart", INT64, ["B", "L"]), *_history_inputs(),
         _io("k", INT64, [1])],
        [_io("top_ids", INT64, ["B", "K"]), _io("top_scores", FLOAT, ["B", "K"]),
         _io("scores", FLOAT, ["B", n_items])],
        "FedCart recommendation: top-k items for padded carts, blended with the user's "
        "own history; cart items are excluded (score -inf).",
    )


def train_step_graph(n_items: int, dim: int) -> onnx.ModelProto:
    """One SGD step of softmax cross-entropy, forward and closed-form backward."""
    g = _Graph()
    _common_consts(g)
    g.const("axis0", np.array([0], np.int64))
    g.const("tiny", np.array(np.finfo(np.float32).tiny, np.float32))
    s = _scores(g, "ctx", n_items, dim)
    logits = s["logits"]

    # d loss / d logits = (softmax - onehot) / B. The one-hot half touches only the B target
    # columns, so it is applied as scatters and gathers on those rows, never as a dense
    # [B, V] tensor: the graph makes two passes over [B, V] (Softmax, then the two products
    # that read it) instead of one per elementwise op. Each group's step is scaled by its
    # learning rate (lr = [e_in, e_out, bias, blend]) on the small [B, ...] side.
    probs = g.op("Softmax", logits, axis=1)
    target_col = g.op("Unsqueeze", "targets", "axis_last")
    target_p = g.op("Max", g.op("GatherElements", probs, target_col, axis=1), "tiny")
    g.op("Neg", g.op("ReduceMean", g.op("Log", target_p), keepdims=0), out="loss")

    batch = g.op("Cast", g.op("Gather", g.op("Shape", "targets"), "zero_i", axis=0), to=FLOAT)

    def rate(name: str) -> str:
        index = g.const(f"lr_idx_{name}", np.array(TENSOR_NAMES.index(name), np.int64))
        return g.op("Div", g.op("Gather", "lr", index, axis=0), batch)

    step = {name: rate(name) for name in model_tensors(dim)}

    bias_step = g.op("Expand", step["bias"], g.op("Shape", "targets"))
    bias_down = g.op("Sub", "bias", g.op("Mul", g.op("ReduceSum", probs, "axis0",
                                                     keepdims=0), step["bias"]))
    g.op("ScatterND", bias_down, target_col, bias_step, reduction="add", out="bias_out")
    if dim:
        u_step = g.op("Mul", s["u"], step["e_out"])
        e_out_down = g.op("Gemm", probs, u_step, "e_out", transA=1, alpha=-1.0, beta=1.0)
        g.op("ScatterND", e_out_down, target_col, u_step, reduction="add", out="e_out_out")
        g_u = g.op("Div", g.op("Sub", g.op("Gather", "e_out", "targets", axis=0),
                               g.op("MatMul", probs, "e_out")), s["count"])
        per_row = g.op("Mul", g.op("Unsqueeze", g.op("Mul", g_u, step["e_in"]), "axis1"),
                       g.op("Unsqueeze", s["mask"], "axis_last"))
        g.op("ScatterND", "e_in", g.op("Unsqueeze", s["safe_ctx"], "axis_last"), per_row,
             reduction="add", out="e_in_out")
    # each blend weight's gradient, read at the entries its feature touches:
    # sum over them of (onehot - softmax) * feature
    def entry_gradient(ids: str) -> str:
        is_target = g.op("Cast", g.op("Equal", ids, target_col), to=FLOAT)
        return g.op("Sub", is_target, g.op("GatherElements", probs, ids, axis=1))

    g_hist, g_nbr = entry_gradient(s["safe_hist"]), entry_gradient(s["nbr_ids"])
    d_blend = g.op("Concat", *(
        g.op("Unsqueeze", g.op("ReduceSum", g.op("Mul", grad, s[f]), keepdims=0), "axis0")
        for grad, f in ((g_hist, "f_log"), (g_hist, "f_any"), (g_hist, "f_co"),
                        (g_nbr, "nbr_w"))), axis=0)
    g.op("Add", "blend", g.op("Mul", d_blend, step["blend"]), out="blend_out")

    inputs = [*_weight_inputs(n_items, dim), _io("ctx", INT64, ["B", "L"]),
              *_history_inputs(), _io("targets", INT64, ["B"]), _io("lr", FLOAT, [4])]
    outputs = [_io("loss", FLOAT, [])] + [_io(f"{n}_out", FLOAT, s)
                                          for n, s in _weight_shapes(n_items, dim).items()]
    return g.model("fedcart_train_step", inputs, outputs,
                   "FedCart local training: one SGD step of softmax cross-entropy.")


def convert_to_ort(onnx_path: Path) -> Path:
    """Convert to the ONNX Runtime Mobile (.ort) format beside the .onnx file (the converter
    onnxruntime ships, with its chatter kept off stdout)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    onnx_path = Path(onnx_path)
    for name in list(logging.root.manager.loggerDict):  # the converter sets its own levels
        if name.startswith("ort_format_model"):
            logging.getLogger(name).setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()):
        convert_onnx_models_to_ort(onnx_path, output_dir=onnx_path.parent,
                                   optimization_styles=[OptimizationStyle.Fixed])
    ort_path = onnx_path.with_suffix(".ort")
    if not ort_path.is_file():
        raise RuntimeError(f"ORT conversion did not produce {ort_path}")
    for leftover in onnx_path.parent.glob(f"{onnx_path.stem}*.config"):
        leftover.unlink()
    return ort_path
