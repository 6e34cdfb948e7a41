"""The README's main job: `keras-opt-ref` trains the examples and prints the table."""

from __future__ import annotations

import re

from keras_opt_ref import cli


def test_demo_prints_one_row_per_method_and_finds_the_weights(capsys):
    assert cli.main(["demo", "--maxiter", "100"]) == 0
    out = capsys.readouterr().out
    rows = [
        line.split()
        for line in out.splitlines()
        if line.startswith(("regression ", "factorization ")) and len(line.split()) == 6
    ]
    expected = len(cli.DEMO_REGRESSION_METHODS) + len(cli.DEMO_FACTORIZATION_METHODS)
    assert len(rows) == expected, out
    for workload, method, loss, nit, nfev, seconds in rows:
        assert float(loss) < 1e-3, f"{workload}/{method} ended at loss {loss}"
        assert int(nfev) >= int(nit) > 0 and float(seconds) > 0
    weights = [float(w) for w in re.search(r"weights \(.*?\): \[(.*?)\]", out).group(1).split(",")]
    assert [round(w, 3) for w in weights] == [1.0, 2.0, 3.0, 4.0]
