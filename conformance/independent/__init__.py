"""Clean-room independent implementations of the keras-opt interface, for measuring the conformance
suite's false-positive rate (on the correct ones) and false-negative rate (on the buggy ones).

Each module exposes ``make_train_function(model, method="CG", maxiter=None, verbose=0, **options)``.
They were written without reading the reference implementation or the suite; they share only
``_refusals.py`` (bad-input validation). Each states in its docstring the levels it offers and each
deliberate bug.
"""

IMPLEMENTATIONS = {
    "args_style": "module-level fun/hessp/hess taking args=(model, batches, state), jac=True; "
                  "bug: objective (and gradient/HVP/Hessian) is the mean of per-batch mean losses",
    "fmin_style": "classic fmin_ncg/fmin_l_bfgs_b/fmin_tnc/fmin_cg/fmin_bfgs wrappers (other methods refused); "
                  "bug: fhess_p ignores its x and uses the weights left by the last f/fprime call",
    "batch_loop_style": "Python generator over the batches, separate fun and jac callables, looped hessp; "
                        "bug: result.x is not written back, the model stays at the last evaluated point",
    "history_style": "compiled tf.function of full-batch loss+gradient on in-memory data, jac=True, least squares too; "
                     "bug: history loss is the mean of all loss values evaluated during the run",
    "numpy_flat": "pure-NumPy flat-vector wrapper class (variable.assign, memo on a copy of x), every method, "
                  "least squares, tf-keras; bug: none",
    "pinn_style": "the PINN tutorials' L-BFGS-B trainer class over get/set of flat weights, L-BFGS-B only; bugs: "
                  "result.x not written back, no best point on an interrupt, a bare assert on weights of rank > 2",
    "float32_style": "hand-written compiled tf.function on float32 tensors, no curvature; bugs: the objective is "
                     "computed in float32 on float64 models, single-output models only (a TensorFlow shape error)",
    "residual_style": "a least_squares (lm/trf/dogbox) wrapper with L-BFGS-B too; bugs: unscaled residuals (r.r = N x "
                      "loss), sample weights missing from the Jacobian, bounds dropped for trf/dogbox, a non-squared "
                      "loss accepted",
    "lenient_style": "dataclass wrapper, no curvature, no counts, refuses nothing it need not (gradient to "
                     "gradient-free methods, unknown methods left to scipy, Dropout in inference mode); bug: none",
    "memo_style": "separate fun/jac/hessp sharing one memo, every minimize method; bug: the memo key (and the "
                  "'skip the assign' test) is np.sum(x)",
    "cached_style": "functional, one combined fun over a dict cache keyed on x.tobytes(); bugs: the cache survives a "
                    "change of data between fits, epochs recognised by the iterator's identity",
    "pinn_loss_style": "the PINN tutorials' optimizer object: get_weights/set_weights flat vector, a tf.function of "
                       "compute_loss and its gradient, float32 constants, L-BFGS-B only; bugs: loss and gradient in "
                       "float32, non-trainable weights in x, result.x never written back",
}

CORRECT = ("numpy_flat", "lenient_style")

# The levels each one does not offer (refused on purpose): the suite must say LIMIT for them, not FAIL.
NOT_OFFERED: dict[str, tuple[str, ...]] = {
    "args_style": ("least_squares",),
    "fmin_style": ("least_squares",),
    "batch_loop_style": ("least_squares",),
    "history_style": (),
    "numpy_flat": (),
    "pinn_style": ("methods", "curvature", "least_squares", "extras"),
    "float32_style": ("curvature", "least_squares"),
    "residual_style": ("methods", "curvature"),
    "lenient_style": ("curvature", "least_squares", "extras"),
    "memo_style": ("least_squares",),
    "cached_style": ("curvature", "least_squares"),
    "pinn_loss_style": ("methods", "curvature", "bounds", "least_squares", "extras"),
}

# Correct but wasteful or noisy: the check must end WARN (not FAIL) with these words.
WARNED: dict[str, dict[str, str]] = {
    "lenient_style": {
        "bad_input::test_unknown_method": "refused it at its entry, before any evaluation",
        "methods::test_method_runs_with_its_derivatives[Nelder-Mead]": "uses no gradient but was handed one",
        "methods::test_method_runs_with_its_derivatives[COBYQA]": "uses no gradient but was handed one",
    },
}

# Checks that must PASS on a buggy one: the suite once blamed these for a bug of another kind (a float32
# objective read as a stale memo or an ignored x).
CLEARED: dict[str, tuple[str, ...]] = {
    "float32_style": ("objective::test_memo_is_keyed_on_the_whole_x",
                      "derivatives::test_gradient_honours_x_in_any_order", "objective::test_repeatable"),
    # its objective is compute_loss in the model's dtype: the PINN checks must not blame its other bugs on it
    "pinn_style": ("objective::test_pinn_loss_is_compute_loss",
                   "derivatives::test_pinn_gradient_matches_finite_differences"),
}

# What the suite must say about each buggy one: a check that fails and words its message must contain.
# "(found by the suite)" marks real bugs the authors did not plant.
DIAGNOSES: dict[str, dict[str, str]] = {
    "args_style": {"objective::test_full_batch_loss_for_data_source[arrays-uneven-batches]":
                   "the mean of the per-batch losses",
                   "objective::test_pinn_loss_is_compute_loss": "the mean of compute_loss over fit's batches of 16"},
    "fmin_style": {"derivatives::test_hvp_honours_x_in_any_order[Newton-CG]": "the weights of the last evaluation"},
    "batch_loop_style": {"fit_contract::test_weights_equal_result_x[Nelder-Mead]": "equal the last point evaluated",
                         "fit_contract::test_weights_equal_result_x[L-BFGS-B]": "equal the last point evaluated",
                         "methods::test_bounds_honoured[COBYLA]": "result.x was not written back"},
    "history_style": {"fit_contract::test_history_loss_and_metrics_at_the_final_weights":
                      "the mean of all losses evaluated during the run"},
    "pinn_style": {
        "fit_contract::test_weights_equal_result_x[L-BFGS-B]": "equal the last point evaluated, not scipy's result.x",
        "fit_contract::test_weights_written_back_when_scipy_stops_early": "equal the last point evaluated",
        "fit_contract::test_interrupt_keeps_the_best_point": "the weights equal the last point evaluated",
        "fit_contract::test_nan_loss_keeps_the_best_finite_point": "the last point evaluated",
        "objective::test_x0_is_the_trainable_weights[conv2d]": "a bare assert failed: `assert len(v.shape) <= 2`",
        "derivatives::test_gradient_matches_finite_differences[conv1d]": "pinn_style.py",
        "methods::test_nonneg_constraint_honoured": "not enforced",  # (found by the suite)
    },
    "float32_style": {
        "derivatives::test_gradient_matches_finite_differences[mlp]": "computed in float32",
        "derivatives::test_value_matches_keras_where_the_gradient_is_checked": "computed in float32",
        "objective::test_multi_input_multi_output": "Dimension 0 in both shapes must be equal",
        "methods::test_nonneg_constraint_honoured": "not enforced",  # (found by the suite)
        # (found by the suite) it applies the compiled loss itself, so a PINN's compute_loss is never called
        "objective::test_pinn_loss_is_compute_loss": "the compute_loss override is bypassed",
    },
    "residual_style": {
        "derivatives::test_least_squares_residuals_and_jacobian[unweighted-lm]": "factor N = 30",
        "derivatives::test_least_squares_residuals_and_jacobian[sample-weights-trf]": "sample weights: they must be "
                                                                                       "inside the Jacobian",
        "methods::test_bounds_honoured[trf]": "were not handed to scipy",
        "methods::test_bounds_honoured[dogbox]": "were not handed to scipy",
        "bad_input::test_least_squares_with_a_loss_that_is_not_squared": "accepted without an error",
        "methods::test_nonneg_constraint_honoured": "not enforced",  # (found by the suite)
    },
    "memo_style": {
        "objective::test_memo_is_keyed_on_the_whole_x": "keyed on a cheap summary of x",
        "derivatives::test_hvp_memo_is_keyed_on_the_whole_x": "keyed on a cheap summary of x",
        "methods::test_nonneg_constraint_honoured": "not enforced",  # (found by the suite)
    },
    "cached_style": {
        "objective::test_second_fit_sees_its_own_data": "the loss on the first fit's data",
        "fit_contract::test_every_epoch_runs_on_its_whole_data[steps_per_epoch]": "one optimization per epoch",
        "methods::test_nonneg_constraint_honoured": "not enforced",  # (found by the suite)
    },
    "pinn_loss_style": {
        "objective::test_pinn_loss_is_compute_loss": "the 2 non-trainable weights (the frozen input scaling) are in x",
        "derivatives::test_pinn_gradient_matches_finite_differences": "it is computed in float32",
        "derivatives::test_gradient_matches_finite_differences[mlp]": "it is computed in float32",
        "fit_contract::test_non_trainable_weights_untouched": "x includes weights that are not trainable",
        "fit_contract::test_weights_equal_result_x[L-BFGS-B]": "equal the last point evaluated, not scipy's result.x",
    },
}
