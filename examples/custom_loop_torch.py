"""A custom PyTorch training loop with SOAA (`KERAS_BACKEND=torch`).

    KERAS_BACKEND=torch python examples/custom_loop_torch.py
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import torch  # noqa: E402
from _data import digits  # noqa: E402

import keras_soaa  # noqa: E402


def main(epochs=5, batch_size=64):
    (x_train, y_train), _ = digits()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
         keras.layers.Dense(10)]
    )
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    steps_per_epoch = -(-len(x_train) // batch_size)
    optimizer = keras_soaa.SOAA(
        learning_rate=0.003, total_steps=epochs * steps_per_epoch
    )
    x_all, y_all = torch.from_numpy(x_train), torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(0)

    for epoch in range(epochs):
        order = torch.randperm(len(x_all), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            loss = loss_fn(y_all[batch], model(x_all[batch], training=True))
            model.zero_grad()
            loss.backward()
            grads = [v.value.grad for v in model.trainable_variables]
            with torch.no_grad():
                optimizer.apply(grads, model.trainable_variables)
                # The loss at the weights before this step.
                optimizer.observe_loss(loss.detach())
        print(f"epoch {epoch}: loss {float(loss):.4f}, "
              f"radius {float(optimizer.radius.numpy()):.3f}")
    return float(loss)


if __name__ == "__main__":
    main()
