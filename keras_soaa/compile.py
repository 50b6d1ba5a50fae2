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
    (tests/test_observe_loss.py::test_non_finite_losses_compiled pins it).
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
    - torch: `compute` recorded once as a graph of torch ops (`TorchTrace`),
      `read` and `write` eagerly.

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
    elif backend == "torch":
        compute = TorchTrace(compute)

    def run(*args):
        return write(compute(*read(*args)))

    if backend == "tensorflow":
        import tensorflow as tf

        run = tf.function(run, autograph=False, jit_compile=jit_compile)
    return run


def _as_function(compute):
    # `jax.jit` wants a plain function (it keeps weak references to it): a
    # callable tuple such as `controllers.Observer` is not one.
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


class TorchTrace:
    """`compute` on torch, replayed as the graph of torch ops it ran once.

    Run op by op, each `keras.ops` call converts and checks its inputs, which
    costs more than the arithmetic of a few scalars. The first call with
    inputs of given shapes and dtypes records the graph with
    `torch.jit.trace`, which fits a pure function that branches on no
    value (its conditions are `where`s); `torch.compile` would cost seconds
    of compilation per configuration and a C++ compiler. Inside
    `torch.compile` (a user's compiled step) `compute` runs as it is, for
    Dynamo to trace.

    Args:
        compute: a pure function of tensors and (named) tuples of tensors,
            returning the same; its other arguments bound (the trace keeps
            Python numbers as constants).
    """

    def __init__(self, compute):
        self._compute = compute
        self._traces = {}  # by the inputs' shapes and dtypes

    def __call__(self, *args):
        """Returns `compute(*args)`, traced for these shapes at first use."""
        import torch

        if torch.compiler.is_compiling():
            return self._compute(*args)
        flat = tuple(_flatten(args))
        signature = tuple((x.shape, x.dtype, x.device) for x in flat)
        # Replayed as recorded: TorchScript's optimizing executor would
        # compile fused kernels at the second call, for no gain on scalars.
        with torch.no_grad(), torch.jit.optimized_execution(False):
            if signature not in self._traces:
                self._traces[signature] = self._trace(args, flat)
            traced, structure = self._traces[signature]
            return _pack(structure, iter(traced(*flat)))

    def _trace(self, args, flat):
        import warnings

        import torch

        structure = []

        def flat_compute(*values):
            outputs = self._compute(*_pack(args, iter(values)))
            if not structure:
                structure.append(outputs)
            return tuple(_flatten(outputs))

        with warnings.catch_warnings():
            # `torch.jit.trace` is deprecated in favour of `torch.compile`
            # (see above), and warns that Python numbers become constants,
            # which they are meant to be.
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(flat_compute, flat, check_trace=False)
        if not structure:  # PYTORCH_JIT=0: `trace` hands `flat_compute` back
            flat_compute(*flat)
        return traced, structure[0]


# `keras.tree` for the tuples (and named tuples) of tensors that `compute`
# takes and returns, at a fraction of its cost per call.
def _flatten(structure):
    if isinstance(structure, tuple):
        for item in structure:
            yield from _flatten(item)
    else:
        yield structure


def _pack(structure, values):
    if not isinstance(structure, tuple):
        return next(values)
    items = [_pack(item, values) for item in structure]
    return type(structure)(*items) if hasattr(structure, "_fields") else tuple(items)
