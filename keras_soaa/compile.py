"""One way to compile a small stateful step on every backend.

The controller step (`SOAA.observe_loss`), the callback's loss hand-over and
eager TensorFlow's update all read some variables, compute, and write
variables back. Run op by op, each costs dozens of tiny dispatches; compiled,
one call. `compile_state_update` compiles that shape of function as each
backend allows, and `CompiledCache` keeps one per configuration.
"""

import keras
from keras import ops


def read_value(variable):
    """The value of `variable` (or tensor), safe to keep while variables change.

    JAX arrays are immutable values. Elsewhere a copy: a torch variable is
    updated in place, so an alias would change under later assignments.
    `x + 0`, not `ops.copy`: under `torch.compile` (torch 2.13),
    `b.assign(copy(a))` then `a.assign(0)` left `b == 0`
    (tests/test_robustness.py::test_non_finite_losses_compiled pins it).
    """
    if keras.backend.backend() == "jax":
        return ops.convert_to_tensor(variable)
    return ops.add(variable, ops.zeros((), variable.dtype))


def compile_state_update(read, compute, write, *, jit_compile=False):
    """Returns `run(*args) = write(compute(*read(*args)))`, compiled.

    - TensorFlow: all three in one `tf.function` (variables are read and
      assigned inside the graph: one call).
    - JAX: `compute` under `jax.jit`, values in and out; `read` and `write`
      run eagerly (JAX variables hold values, not buffers to write into).
    - torch: eagerly.

    Args:
        read: `(*args) -> tuple`, the inputs of `compute`.
        compute: a pure function of `read`'s outputs.
        write: takes `compute`'s output, assigns variables, returns the
            result of `run`.
        jit_compile: TensorFlow only: compile with XLA.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        compute = jax.jit(_as_function(compute))

    def run(*args):
        return write(compute(*read(*args)))

    if backend == "tensorflow":
        import tensorflow as tf

        run = tf.function(run, autograph=False, jit_compile=jit_compile)
    return run


def _as_function(compute):
    # `jax.jit` wants a plain function (it keeps weak references to it): a
    # callable tuple such as `trust_region.PaperController` is not one.
    def function(*args):
        return compute(*args)

    return function


class CompiledCache:
    """Compiled functions by key: a key is what the function was built for."""

    def __init__(self):
        self._functions = {}

    def get(self, key, build):
        """Returns the function for `key`, calling `build()` the first time."""
        if key not in self._functions:
            self._functions[key] = build()
        return self._functions[key]
