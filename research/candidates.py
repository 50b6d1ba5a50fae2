"""Runs `benchmarks/compare.py` with the research candidates in its optimizer table.

    python research/candidates.py --full --set calibration \
        --optimizers sf_soaa,sf_soaa_hd,adam --out DIR

Takes `compare.py`'s arguments. The candidates (`schedule_free_soaa.install()`:
`sf_soaa`, `sf_soaa_hd`, `sf_soaa_r1`, `sf_soaa_r2`;
`quadratic_prediction.install()`: `soaa_sbq_cosine`) join the table for this
run only; nothing is registered on import. (The same-batch test predicted from
the batch's own gradient, a candidate here as `soaa_sbg_cosine`, became the
package's `same_batch` controller and `presets.recommended` in 0.5.0.)
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))


def main(argv=None):
    """Installs the candidates, then runs `compare.main(argv)`."""
    import compare

    backend = argparse.ArgumentParser(add_help=False)
    backend.add_argument("--backend")
    # Before Keras is imported; `compare.main` parses the rest.
    compare.select_backend(backend.parse_known_args(argv)[0].backend)
    install()
    return compare.main(argv)


def install():
    """Adds every research candidate's rows to the benchmark's table."""
    import quadratic_prediction
    import schedule_free_soaa

    schedule_free_soaa.install()
    quadratic_prediction.install()


if __name__ == "__main__":
    main()
