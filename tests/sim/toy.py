"""A tiny model in plain numpy that follows the Model protocol: the sim tests' plug-in model.

Client i's objective is 0.5 ||w - m_i||^2 with m_i the mean of its rows, so its local
step is known in closed form; a little noise from the client's generator makes every
client's update depend on its own random stream.
"""
import numpy as np

from fedkern.sim.models import Evaluation, TrainResult


class ToyModel:
    n_classes = 2

    def __init__(self, n_features: int, noise: float = 1e-3):
        self.n_params = n_features
        self.noise = noise
        self.calls = 0

    def init(self, rng):
        return rng.standard_normal(self.n_params).astype(np.float32)

    def train(self, params, x, y, config, rng, delta_out):
        self.calls += 1
        w = params.astype(np.float64)
        target = x.mean(axis=0)
        for _ in range(config.epochs):
            w -= config.lr * ((w - target) + config.mu * (w - params))
        w += self.noise * rng.standard_normal(w.shape)
        delta_out[:] = w - params
        return TrainResult(loss=float(0.5 * np.sum((params - target) ** 2)), steps=config.epochs)

    def loss(self, params, x, y):
        return float(0.5 * np.sum((params - x.mean(axis=0)) ** 2))

    def evaluate(self, params, x, y):
        predicted = (x @ params > 0).astype(np.int32)
        recall = np.array([np.mean(predicted[y == c] == c) if np.any(y == c) else np.nan for c in range(2)])
        return Evaluation(loss=self.loss(params, x, y), accuracy=float(np.mean(predicted == y)), recall=recall,
                          n=len(y))
