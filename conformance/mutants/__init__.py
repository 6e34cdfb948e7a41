"""Deliberately broken implementations, each modeled on a real bug, to prove the suite's power.

Each module exposes ``make_train_function`` like any implementation. Most are the reference
with exactly one thing broken; ``fit_always_raises`` is not (no check may pass on it).
``MUTANTS`` maps each to the checks that must catch it, each with words its failure message
must contain: the suite must not only fail the mutant, it must say what is wrong.
``EVERY_CHECK`` means every check of the suite must fail.
"""

EVERY_CHECK = "*"
# Mutants of the TensorFlow objective's internals (graphs, chunk weights, tf.Variables) or of a TensorFlow-only
# feature: they exist on TensorFlow (Keras 3 and tf-keras) only. The others break the NumPy API or the train
# function and run on every backend.
TENSORFLOW_ONLY = frozenset({
    "per_batch_means", "regularization_dropped", "sample_weights_ignored", "indexed_slices_duplicates_dropped",
    "wrong_unpack_order", "non_trainable_included", "stale_data_across_fits", "hvp_on_a_subset",
    "gauss_newton_as_exact", "training_mode", "add_loss_dropped",
})
# Bugs that are float32 rounding in float64 arithmetic: invisible where the backend itself computes a
# float64 model partly in float32 (Keras 3 on JAX and torch, truth.working_precision).
NEEDS_FLOAT64_ARITHMETIC = frozenset({"hvp_float32"})
_HVP = "derivatives::test_hvp_matches_finite_differences[trust-ncg]"

MUTANTS: dict[str, dict[str, str]] = {
    # the twelve of the first catalogue
    "per_batch_means": {"objective::test_full_batch_loss_for_data_source[arrays-uneven-batches]":
                        "the mean of the per-batch losses"},
    "hessp_ignores_x": {"derivatives::test_hvp_honours_x_in_any_order[trust-ncg]":
                        "the weights of the last evaluation"},
    "regularization_dropped": {"objective::test_regularization_losses": "without the regularization term"},
    "sample_weights_ignored": {"objective::test_sample_weights": "without the sample weights",
                               "objective::test_class_weight": "without the class weights"},
    "float32_gradients": {"derivatives::test_gradient_is_a_float64_vector": "float64"},
    "indexed_slices_duplicates_dropped": {
        "derivatives::test_embedding_gradient_with_repeated_indices[embedding]": "IndexedSlices"},
    "hvp_sign_error": {_HVP: "wrong sign"},
    "hvp_scale_error": {_HVP: "wrong scale"},
    "wrong_unpack_order": {"objective::test_x0_is_the_trainable_weights[mlp]": "layout"},
    "non_trainable_included": {"fit_contract::test_non_trainable_weights_untouched": "not trainable"},
    "hessian_never_passed": {"methods::test_method_runs_with_its_derivatives[trust-ncg]": "scipy rejected",
                             _HVP: "Hessian-vector product is required"},
    "bounds_dropped": {"methods::test_bounds_honoured[L-BFGS-B]": "were not handed to scipy"},
    # state and caching
    "memo_by_identity": {"objective::test_memo_is_keyed_on_the_whole_x": "the array's old values"},
    "memo_approximate": {"objective::test_memo_is_keyed_on_the_whole_x": "np.allclose"},
    "stale_data_across_fits": {"objective::test_second_fit_sees_its_own_data": "the first fit's data"},
    # where the weights end up
    "last_evaluated_point": {"fit_contract::test_weights_equal_result_x[Nelder-Mead]": "the last point evaluated",
                             "fit_contract::test_weights_equal_result_x[L-BFGS-B]": "the last point evaluated"},
    "written_back_only_on_success": {"fit_contract::test_weights_written_back_when_scipy_stops_early":
                                     "the start weights"},
    "nothing_kept_on_failure": {"fit_contract::test_nan_loss_keeps_the_best_finite_point": "best finite point"},
    # what history reports; options; counts
    "metrics_at_start": {"fit_contract::test_history_loss_and_metrics_at_the_final_weights": "at the start weights"},
    "maxiter_ignored": {"methods::test_maxiter_reaches_scipy[L-BFGS-B]": "did not reach scipy"},
    "counts_from_result": {"fit_contract::test_counts_match_observed_calls[trust-ncg]": "but scipy called"},
    # curvature
    "hvp_on_a_subset": {_HVP: "subset of the data"},
    "hvp_float32": {"derivatives::test_hvp_is_linear_and_symmetric": "linear"},
    "gauss_newton_as_exact": {_HVP: "Gauss-Newton"},
    "hessp_by_finite_differences": {"derivatives::test_hvp_is_linear_and_symmetric": "finite-difference"},
    # Keras semantics
    "training_mode": {"objective::test_inference_mode": "the loss in training mode"},
    "add_loss_dropped": {"objective::test_add_loss": "without the add_loss term"},
    "one_run_per_call": {"objective::test_steps_per_execution": "one optimization per epoch",
                         "fit_contract::test_one_optimization_per_epoch": "one optimization per epoch"},
    "nonneg_ignored": {"methods::test_nonneg_constraint_honoured": "NonNeg"},
    # nothing may pass when fit cannot succeed
    "fit_always_raises": {EVERY_CHECK: "AttributeError"},
    "crashes_after_scipy": {EVERY_CHECK: "AttributeError"},
}
