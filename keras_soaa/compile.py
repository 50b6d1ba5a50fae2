"""One way to compile a small stateful step on every backend.

The controller step (`SOAA.observe_loss`), the callback's loss hand-over and
eager TensorFlow's update read variables, compute, and write variables back:
op by op, dozens of tiny dispatches; compiled (`compile_state_update`), one
call. `CompiledCache` keeps one per configuration.
"""

import keras
from keras import ops


def read_value(variable):
    """The value of `variable` (or tensor), safe to keep while variables change.

    Elsewhere than JAX a copy: a torch variable is updated in place. `x + 0`,
    not `ops.copy`: under `torch.compile`, `b.assign(copy(a))` then
    `a.assign(0)` left `b == 0` (tests/test_observe_loss.py pins it).
    """
    backend = keras.backend.backend()
    if backend == "jax":
        return ops.convert_to_tensor(variable)
    if backend == "torch":  # the op `ops.add` runs, without its checks (per batch)
        import torch

        return torch.add(getattr(variable, "value", variable), 0)
    return ops.add(variable, ops.zeros((), variable.dtype))


def assign_values(variables, values):
    """Assigns each of `values` (of its variable's dtype and shape) to its variable.

    On torch, eagerly: a plain in-place copy each, where `Variable.assign`
    would convert and check its value first (they run per batch in `fit`,
    a few scalars each).
    """
    variables, values = list(variables), list(values)
    if keras.backend.backend() == "torch" and not _traced_or_stateless():
        import torch

        with torch.no_grad():
            for variable, value in zip(variables, values):
                variable.value.copy_(torch.as_tensor(value))
        return
    for variable, value in zip(variables, values):
        variable.assign(value)


def _traced_or_stateless():
    # Inside `torch.compile`, or a `keras.StatelessScope` (where `value`
    # is the scope's, and an assignment must go through it).
    import torch

    from keras_soaa import _keras_internals as internals

    return torch.compiler.is_compiling() or internals.in_stateless_scope()


def compile_state_update(read, compute, write, *, jit_compile=False):
    """Returns `run(*args) = write(compute(*read(*args)))`, compiled.

    TensorFlow: all three in one `tf.function`. JAX: `compute` under `jax.jit`,
    `read` and `write` eagerly (JAX variables hold values, not buffers). torch:
    `compute` replayed as a graph of torch ops (`TorchTrace`), the rest eagerly.

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


def replayed_on_torch(compute):
    """`compute` (pure), replayed as a graph on torch (`TorchTrace`).

    Elsewhere as it is: it runs inside a compiled step there.
    """
    return TorchTrace(compute) if keras.backend.backend() == "torch" else compute


def _as_function(compute):
    # `jax.jit` keeps weak references: a callable tuple (`Observer`) won't do.
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

    Op by op, each `keras.ops` call's checks cost more than the arithmetic of
    a few scalars. The first call per input shapes and dtypes records the
    graph with `torch.jit.trace` (fits a pure function with no value branch);
    `torch.compile` would cost seconds per configuration and a C++ compiler.
    Inside `torch.compile`, `compute` runs as it is, for Dynamo to trace.

    Args:
        compute: a pure function of (named tuples of) tensors, returning the
            same; other arguments bound (the trace keeps numbers as constants).
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
        # As recorded: the optimizing executor's fused kernels gain nothing here.
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
            # `trace` is deprecated, and warns that numbers become constants (meant).
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(flat_compute, flat, check_trace=False)
        if not structure:  # PYTORCH_JIT=0: `trace` hands `flat_compute` back
            flat_compute(*flat)
        return traced, structure[0]


# `keras.tree` for (named) tuples of tensors, at a fraction of its cost.
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
