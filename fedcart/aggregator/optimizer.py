"""Server optimizers applied to the (noised) mean update (Reddi et al. 2021, "Adaptive
Federated Optimization"): FedAvg with a server learning rate, and FedAdam. Their state is
plain float arrays the aggregator persists with each model version."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["FedAdam", "FedAvg", "ServerOptimizer", "make_optimizer"]


@dataclass
class FedAvg:
    """w <- w + lr * mean_delta."""

    lr: float = 1.0

    def step(self, weights: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        return weights + self.lr * mean_delta

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load(self, state: dict[str, np.ndarray]) -> None:
        del state


@dataclass
class FedAdam:
    """Adam on the pseudo-gradient -mean_delta, with bias correction."""

    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-3
    _m: np.ndarray | None = field(default=None, repr=False)
    _v: np.ndarray | None = field(default=None, repr=False)
    _t: int = 0

    def step(self, weights: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        if self._m is None or self._v is None:
            self._m = np.zeros_like(mean_delta)
            self._v = np.zeros_like(mean_delta)
        self._t += 1
        self._m = self.beta1 * self._m + (1 - self.beta1) * mean_delta
        self._v = self.beta2 * self._v + (1 - self.beta2) * mean_delta**2
        m_hat = self._m / (1 - self.beta1**self._t)
        v_hat = self._v / (1 - self.beta2**self._t)
        return weights + self.lr * m_hat / (np.sqrt(v_hat) + self.eps)

    def state(self) -> dict[str, np.ndarray]:
        if self._m is None or self._v is None:
            return {}
        return {"m": self._m, "v": self._v, "t": np.array([self._t], np.float64)}

    def load(self, state: dict[str, np.ndarray]) -> None:
        if state:
            self._m, self._v, self._t = state["m"], state["v"], int(state["t"][0])


ServerOptimizer = FedAvg | FedAdam


def make_optimizer(name: str, lr: float) -> ServerOptimizer:
    if name == "fedavg":
        return FedAvg(lr)
    if name == "fedadam":
        return FedAdam(lr)
    raise ValueError(f"server optimizer must be 'fedavg' or 'fedadam', got {name!r}")
