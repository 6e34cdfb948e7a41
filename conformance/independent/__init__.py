"""Clean-room independent implementations of the keras-opt interface, for measuring the conformance
suite's false-positive rate (on the correct one) and false-negative rate (on the buggy ones).

Each module exposes ``make_train_function(model, method="CG", maxiter=None, verbose=0, **options)``.
They were written without reading the reference implementation or the suite; they share only
``_refusals.py`` (bad-input validation).
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
}

CORRECT = ("numpy_flat",)

# What the suite must say about each buggy one: a check that fails and words its message must contain.
DIAGNOSES: dict[str, dict[str, str]] = {
    "args_style": {"objective::test_full_batch_loss_for_data_source[arrays-uneven-batches]":
                   "the mean of the per-batch losses"},
    "fmin_style": {"derivatives::test_hvp_honours_x_in_any_order[Newton-CG]": "the weights of the last evaluation"},
    "batch_loop_style": {"fit_contract::test_weights_equal_result_x[Nelder-Mead]": "the last point scipy evaluated"},
    "history_style": {"fit_contract::test_history_loss_and_metrics_at_the_final_weights":
                      "the mean of all losses evaluated during the run"},
}
