"""Smoke tests: the examples run offline and train."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
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


def test_tfds_pipeline_prepares_and_trains_offline(tmp_path, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the tfds example tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    example = load_example("tfds_pipeline")
    history, accuracy = example.main(data_dir=str(tmp_path), epochs=2, verbose=0)
    assert (tmp_path / "sklearn_digits" / "1.0.0").is_dir()
    assert accuracy > 0.8
    assert len(history.history["radius"]) == 2
    train, test, info = example.load("sklearn_digits", str(tmp_path), 1000)
    assert info.splits["train"].num_examples == 1437
    assert info.splits["test"].num_examples == 360
    images, labels = next(iter(test))
    assert images.shape == (360, 8, 8, 1) and float(images.numpy().max()) == 1.0
    assert sorted(set(labels.numpy().tolist())) == list(range(10))


def test_transformer_lm_data_is_stdlib_source():
    example = load_example("transformer_lm")
    text = example.stdlib_text()
    assert text == example.stdlib_text() and 100_000 < len(text) <= 300_000
    assert "def " in text and "import " in text
    assert example.decode(example.encode("def f(x):\n")) == "def f(x):\n"
    train, held_out = example.split_ids()
    assert len(held_out) == pytest.approx(0.1 * (len(train) + len(held_out)), abs=1)
    x, y = example.random_windows(train, 5, 16, seed=0)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


def test_transformer_lm_learns():
    example = load_example("transformer_lm")
    history, held_out_loss = example.main(
        steps=20, seq_len=32, dim=32, layers=1, sample_chars=5, verbose=0
    )
    # Uniform guessing costs log(97) = 4.57 nats per character.
    assert held_out_loss < np.log(example.VOCAB_SIZE) - 0.5
    assert len(history.history["radius"]) == 10


def test_keras_hub_lm_trains_with_soaa_and_adam():
    pytest.importorskip("keras_hub")
    example = load_example("keras_hub_lm")
    losses = example.main(
        steps=10, batch_size=8, seq_len=16, hidden_dim=32, layers=1, verbose=0
    )
    assert set(losses) == {"SOAA", "Adam"}
    # Uniform guessing costs log(256) = 5.55 nats per byte.
    for train_loss, held_out_loss in losses.values():
        assert np.isfinite(train_loss) and held_out_loss < np.log(256) - 0.5
