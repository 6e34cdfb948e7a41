"""Deliberately broken implementations, each modeled on a real bug, to prove the suite's power.

Each module exposes ``make_train_function`` like any implementation; ``MUTANTS`` lists them.
They are the reference with exactly one thing broken.
"""

MUTANTS = (
    "per_batch_means",
    "hessp_ignores_x",
    "regularization_dropped",
    "sample_weights_ignored",
    "float32_gradients",
    "indexed_slices_duplicates_dropped",
    "hvp_sign_error",
    "hvp_scale_error",
    "wrong_unpack_order",
    "non_trainable_included",
    "hessian_never_passed",
    "bounds_dropped",
)
