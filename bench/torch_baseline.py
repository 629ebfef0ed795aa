"""PyTorch eager versions of the FedCart model, as benchmark baselines (the ``bench`` extra
installs the torch 2.13.0 CPU build). Same parameters, same scores, same SGD step as
fedcart/model_export/model.py: EmbeddingBag (sum, scaled by 1/sqrt(n)) for the cart, a Linear layer
for e_out and the bias, the cart's item-item neighbours and the history blend added at their
items (scatter_add). A model of d = 0 has no EmbeddingBag or Linear layer: its logits start
from the bias, as the ONNX graphs' do."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedcart.model_export.features import Batch
from fedcart.model_export.model import ITEM_ITEM, TENSOR_NAMES, Neighbours, Weights

torch.set_num_threads(1)


class TorchModel(nn.Module):
    def __init__(self, w: Weights, nbrs: Neighbours) -> None:
        super().__init__()
        self.nbr_ids = torch.from_numpy(nbrs.ids)
        self.nbr_w = torch.from_numpy(nbrs.weights)
        self.blend = nn.Parameter(torch.from_numpy(w.blend.copy()))
        self.e_in: nn.EmbeddingBag | None = None
        self.out: nn.Linear | None = None
        if w.dim:
            self.e_in = nn.EmbeddingBag(w.n_items, w.dim, mode="sum", sparse=True)
            self.out = nn.Linear(w.dim, w.n_items)
            with torch.no_grad():
                self.e_in.weight.copy_(torch.from_numpy(w.e_in))
                self.out.weight.copy_(torch.from_numpy(w.e_out))
                self.out.bias.copy_(torch.from_numpy(w.bias))
        else:
            self.bias = nn.Parameter(torch.from_numpy(w.bias.copy()))

    def named(self) -> dict[str, torch.Tensor]:
        """The parameters under the names of model.TENSOR_NAMES that the model has."""
        if self.e_in is None or self.out is None:
            return {"bias": self.bias, "blend": self.blend}
        return {"e_in": self.e_in.weight, "e_out": self.out.weight, "bias": self.out.bias,
                "blend": self.blend}

    def forward(self, ctx: torch.Tensor, hist_ids: torch.Tensor,
                hist_w: torch.Tensor, hist_co: torch.Tensor) -> torch.Tensor:
        valid = ctx >= 0
        rows = ctx.shape[0]
        if self.e_in is None or self.out is None:
            logits = self.bias.expand(rows, -1)
        else:
            counts = valid.sum(dim=1).clamp(min=1).to(torch.float32)
            weights = valid.to(torch.float32) / counts.sqrt().unsqueeze(1)
            u = self.e_in(ctx.clamp(min=0), per_sample_weights=weights)
            logits = self.out(u)
        nbr_w = self.nbr_w[ctx.clamp(min=0)] * valid.unsqueeze(-1) * self.blend[ITEM_ITEM]
        logits = logits.scatter_add(1, self.nbr_ids[ctx.clamp(min=0)].reshape(rows, -1),
                                    nbr_w.reshape(rows, -1))
        h_valid = hist_ids >= 0
        bonus = (self.blend[0] * torch.log1p(hist_w) + self.blend[1]
                 + self.blend[2] * torch.log1p(hist_co)) * h_valid
        return logits.scatter_add(1, hist_ids.clamp(min=0), bonus)


def recommender(w: Weights, nbrs: Neighbours):  # type: ignore[no-untyped-def]
    model = TorchModel(w, nbrs).eval()

    def top10(cart: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            ctx = torch.from_numpy(cart).unsqueeze(0)
            empty = torch.full((1, 1), -1, dtype=torch.int64)
            scores = model(ctx, empty, torch.zeros(1, 1), torch.zeros(1, 1))
            scores[0, ctx[0]] = -torch.inf
            return torch.topk(scores, 10, dim=1).indices[0].numpy()

    return top10


def trainer(w: Weights, nbrs: Neighbours,  # type: ignore[no-untyped-def]
            learning_rates: np.ndarray):
    model = TorchModel(w, nbrs)
    optim = torch.optim.SGD([
        {"params": [param], "lr": float(learning_rates[TENSOR_NAMES.index(name)])}
        for name, param in model.named().items()])

    def step(batch: Batch) -> float:
        optim.zero_grad()
        logits = model(torch.from_numpy(batch.ctx), torch.from_numpy(batch.hist_ids),
                       torch.from_numpy(batch.hist_w), torch.from_numpy(batch.hist_co))
        loss = nn.functional.cross_entropy(logits, torch.from_numpy(batch.targets))
        loss.backward()
        optim.step()
        return float(loss.detach())

    def weights() -> dict[str, np.ndarray]:
        return {name: param.detach().numpy() for name, param in model.named().items()}

    return step, weights
