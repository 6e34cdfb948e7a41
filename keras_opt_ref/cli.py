"""``keras-opt-ref``: train the README's examples with several methods and print a table."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEMO_REGRESSION_METHODS = ("CG", "BFGS", "L-BFGS-B", "Newton-CG", "trust-ncg", "trust-krylov", "trust-exact")
DEMO_FACTORIZATION_METHODS = ("L-BFGS-B", "CG", "Newton-CG", "trust-ncg", "trust-krylov")


def demo(maxiter: int = 200) -> int:
    """Fit the README regression and a small factorization; print method, loss, nit, nfev, seconds."""
    from . import scipy_optimizer
    from .base import keras_compat
    from .bench import workloads

    keras = keras_compat.default_keras()
    X, y = workloads.readme_regression()
    fact = workloads.factorization_data(*workloads.FACTORIZATION_SIZES["tiny"])
    rows = []

    def run(name, build, x, y, method):
        model = build()
        model.compile(loss="mse")
        model.train_function = scipy_optimizer.make_train_function(model, method=method, maxiter=maxiter)
        start = time.perf_counter()
        history = model.fit(x, y, verbose=0)
        seconds = time.perf_counter() - start
        h = history.history
        rows.append((name, method, h["loss"][-1], int(h["nit"][-1]), int(h["nfev"][-1]), seconds))
        return model

    for method in DEMO_REGRESSION_METHODS:
        model = run("regression", lambda: workloads.linear_model(keras, 4, use_bias=False), X, y, method)
    weights = model.get_weights()[0].ravel()
    for method in DEMO_FACTORIZATION_METHODS:
        run(
            "factorization",
            lambda: workloads.factorization_model(keras, fact.n_users, fact.n_items),
            fact.x,
            fact.ratings,
            method,
        )
    print(f"keras flavour: {keras.__name__} {keras.__version__}")
    print(f"{'workload':<14} {'method':<13} {'final loss':>12} {'nit':>5} {'nfev':>5} {'seconds':>8}")
    for name, method, loss, nit, nfev, seconds in rows:
        print(f"{name:<14} {method:<13} {loss:>12.4e} {nit:>5} {nfev:>5} {seconds:>8.2f}")
    print(f"regression weights ({DEMO_REGRESSION_METHODS[-1]}): {weights.round(6).tolist()} (true: [1, 2, 3, 4])")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keras-opt-ref", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    demo_parser = sub.add_parser("demo", help="train the README examples (the default)")
    demo_parser.add_argument("--maxiter", type=int, default=200)
    conf = sub.add_parser("conformance", help="run the conformance suite and print the check x implementation matrix")
    conf.add_argument("--impl", action="append", help="module exposing make_train_function (repeatable); "
                      "default: the reference, keras_opt_ref.scipy_optimizer")
    conf.add_argument("--mutants", action="store_true", help="also run every mutant and print the mutation score")
    conf.add_argument("--out", default="reports", help="folder for conformance.md and conformance.json")
    conf.add_argument("--fail-fast", action="store_true", help="stop each mutant's run at its first failing check")
    conf.add_argument("--independent", action="store_true",
                      help="also run the independent implementations (other styles, one correct)")
    conf.add_argument("--check-timeout", type=float, default=None, help="seconds per check (default 300; 0: off)")
    conf.add_argument("--timeout", type=float, default=1800.0, help="seconds per implementation's whole run")
    conf.add_argument("--levels", default=None, help="levels to check (core always): methods, curvature, bounds, "
                      "least_squares, extras, 'all'; default: each optional level unless the implementation refuses it")
    bench_parser = sub.add_parser("bench", help="measure the ratios (floor, HVP, alternatives, Adam) and plot")
    bench_parser.add_argument("--quick", action="store_true", help="fewer rounds, 10 s of Adam, scaling to 4x only")
    bench_parser.add_argument("--out", default="reports", help="folder for bench.md, bench.json and bench.png")
    bench_parser.add_argument("--adam-seconds", type=float, default=None, help="Adam's budget per configuration")
    only = bench_parser.add_mutually_exclusive_group()
    only.add_argument("--pinn", action="store_true", help="only the PINN time-to-error race (poisson2d small, and "
                      "medium unless --quick), written to pinn.md and pinn.json")
    only.add_argument("--side-by-side", action="store_true", help="only the fair side-by-side against other "
                      "libraries' L-BFGS (medium, and large unless --quick), to side-by-side.md and .json")
    only.add_argument("--boundary", action="store_true", help="only one evaluation taken apart on each installed "
                      "backend against the same math hand-written (medium), to boundary.md and .json")
    args = parser.parse_args(argv)
    if args.command in (None, "demo"):
        return demo(getattr(args, "maxiter", 200))
    if args.command == "conformance":
        from keras_opt_ref_conformance import report

        extra = [] if args.check_timeout is None else ["--check-timeout", str(args.check_timeout)]
        extra += [] if args.levels is None else ["--levels", args.levels]
        return report.main(args.impl or ["keras_opt_ref.scipy_optimizer"], args.mutants, args.out, args.fail_fast,
                           with_independent=args.independent, timeout=args.timeout, extra=extra)
    if args.command == "bench":
        from .bench import measure

        section = "pinn" if args.pinn else "side-by-side" if args.side_by_side else "boundary" if args.boundary else ""
        if section:
            measure.section_only(section, quick=args.quick, out=args.out)
        else:
            measure.summary(quick=args.quick, out=args.out, adam_seconds=args.adam_seconds)
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
