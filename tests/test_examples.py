"""Smoke tests: the examples run offline and train."""

import importlib
import sys
from pathlib import Path

import numpy as np
from conftest import BACKEND

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))


def load_example(name):
    return importlib.import_module(name)


def test_quickstart():
    history, accuracy = load_example("quickstart").main(epochs=3, verbose=0)
    assert accuracy > 0.8
    assert len(history.history["radius"]) == 3


def test_custom_training_loop_of_this_backend():
    final_loss = load_example(f"custom_loop_{BACKEND}").main(epochs=3)
    assert np.isfinite(final_loss) and final_loss < 1.0
