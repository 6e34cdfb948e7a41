"""asv: seconds and peak memory per evaluation as the factorization's ratings grow 1x, 4x, 16x."""

from __future__ import annotations

import math

from keras_opt_ref import TensorFlowObjective
from keras_opt_ref.base import keras_compat as _keras
from keras_opt_ref.bench import measure, workloads


class Scaling:
    params = ([1, 4, 16],)
    param_names = ("ratings_factor",)
    timeout = 600

    def setup(self, factor):
        users, items, ratings = workloads.FACTORIZATION_SIZES["medium"]
        grow = math.sqrt(factor)
        data = workloads.factorization_data(int(users * grow), int(items * grow), ratings * factor)
        model = workloads.factorization_model(_keras.default_keras(), data.n_users, data.n_items)
        model.compile(loss="mse")
        self.objective = TensorFlowObjective(model, data.x, data.ratings)
        self.point = measure.cycling_points(self.objective.flat.read(), 3)
        self.objective.value_and_grad(self.point())

    def time_loss_and_gradient(self, factor):
        self.objective.value_and_grad(self.point())

    def peakmem_loss_and_gradient(self, factor):
        self.objective.value_and_grad(self.point())
