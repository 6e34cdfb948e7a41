"""The benchmark harness (not the library: nothing in keras_opt_ref outside ``bench`` and ``cli``
imports it). ``workloads`` (the models and data), ``measure`` (the measurements and the
``keras-opt-ref bench`` report), ``baselines`` (the ways users write it by hand), ``same_math``
(the same math written directly on a flat vector), ``alternatives`` (other libraries' L-BFGS),
``backends`` (the reference on each Keras backend), ``boundary`` (one evaluation taken apart, per
backend), ``side_by_side`` (time to a target against other libraries, one process each), ``timing`` (round by
round timing), ``cluster`` (localhost multi-worker runs), ``pinn`` and ``pinn_timing`` (PINN workloads and race).
"""
