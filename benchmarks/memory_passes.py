"""Counts the passes over memory of one optimizer step: counted, not timed.

    python benchmarks/memory_passes.py [--shape 1024,1024] [--print-hlo soaa]

A step on a large variable is bound by memory traffic: its cost is about
the number of reads and writes of variable-sized arrays. Counted for one
`apply` on one variable: on TensorFlow (XLA) and JAX, every full-size read
and write by an instruction of XLA's optimized HLO entry computation (ideal
Adam, which XLA makes of Keras' Adam: 4 reads g, m, v, theta and 3 writes;
on JAX with the state returned in the order it is donated, as in `fit`);
on torch (eager), every top-level kernel touching full-size arrays.
On a small model kernel launches, not memory, bound the step:
`count_kernels` counts those of one `apply` on several variables (XLA's
kernels; torch's top-level operations). `tests/test_memory_passes.py` pins
SOAA's counts; the performance docs report them.
"""

import argparse
import math
import re

_SHAPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
# Instructions that only name values (no loop over memory), and `conditional`,
# whose branches run only when taken (SOAA's rescaled sums).
_NO_PASS = {"parameter", "tuple", "get-tuple-element", "constant", "bitcast",
            "conditional"}
# torch ops that make views or no-op casts, not passes over memory.
_TORCH_VIEWS = {"aten::to", "aten::reshape", "aten::view", "aten::_reshape_alias",
                "aten::detach", "aten::alias", "aten::lift_fresh", "aten::t"}


def _full_size_count(shape_text, size):
    sizes = [math.prod(int(d) for d in dims.split(",") if d)
             for dims in _SHAPE.findall(shape_text)]
    return sizes.count(size)


def entry_computation(hlo_text):
    """The instruction lines of the ENTRY computation of an HLO module."""
    lines = hlo_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ENTRY"))
    body = lines[start + 1:]
    return body[:next((i for i, line in enumerate(body) if line.startswith("}")),
                      len(body))]


def count_hlo_passes(hlo_text, size):
    """Returns `(reads, writes)` of arrays of `size` elements in the entry."""
    shapes = {}
    reads = writes = 0
    for line in entry_computation(hlo_text):
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape_text, opcode, rest = match.groups()
        shapes[name] = shape_text
        if opcode in _NO_PASS:
            continue
        operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
        reads += sum(_full_size_count(shapes.get(o, ""), size) for o in operands)
        writes += _full_size_count(shape_text, size)
    return reads, writes


def _variables(shape_or_shapes):
    # One variable of `shape`, or one per shape of a list.
    import keras
    import numpy as np

    shapes = (shape_or_shapes if isinstance(shape_or_shapes, list)
              else [shape_or_shapes])
    return [keras.Variable(np.ones(shape, "float32")) for shape in shapes]


def jax_apply_hlo(optimizer, shape):
    """Optimized HLO of `optimizer.stateless_apply` on one variable (JAX).

    `shape` may be a list of shapes: one variable each.
    """
    import jax
    import numpy as np

    variables = _variables(shape)
    optimizer.build(variables)

    def apply(optimizer_values, grads, values):
        # The state comes back in the order it went in, as in `fit`'s train step:
        # JAX pairs donated inputs with same-shaped outputs in order, and
        # `stateless_apply` returns the weights first, which would send the new
        # weights into `m`'s buffer (XLA then copies).
        values, optimizer_values = optimizer.stateless_apply(optimizer_values, grads,
                                                             values)
        return optimizer_values, values

    apply = jax.jit(apply, donate_argnums=(0, 2))
    return apply.lower([v.value for v in optimizer.variables],
                       [np.ones(v.shape, "float32") for v in variables],
                       [v.value for v in variables]).compile().as_text()


def tensorflow_apply_hlo(optimizer, shape):
    """Optimized HLO of `optimizer.apply` under XLA on one variable (TF).

    `shape` may be a list of shapes: one variable each.
    """
    import tensorflow as tf

    variables = _variables(shape)
    optimizer.build(variables)
    apply = tf.function(lambda grads: optimizer.apply(grads, variables),
                        jit_compile=True)
    grads = [tf.ones(v.shape) for v in variables]
    return apply.experimental_get_compiler_ir(grads)(stage="optimized_hlo")


def torch_top_level_ops(optimizer, shapes, record_shapes=False):
    """The top-level torch operations of one eager `apply` (the second; views
    excluded): profiler events of `aten::` operations not inside another."""
    import keras
    import torch

    variables = _variables(shapes)
    grads = [keras.ops.ones(v.shape) for v in variables]
    optimizer.apply(grads, variables)  # builds; the counted step is the second
    with torch.profiler.profile(record_shapes=record_shapes) as profile:
        optimizer.apply(grads, variables)
    return [event for event in profile.events()
            if event.name.startswith("aten::") and event.name not in _TORCH_VIEWS
            and not (event.cpu_parent is not None
                     and event.cpu_parent.name.startswith("aten::"))]


def torch_full_size_kernels(optimizer, shape):
    """Top-level torch kernels of one eager `apply` touching full-size arrays: a
    `torch._foreach_*` call counts once (the profiler records no shapes of its
    list inputs), any other when an input has the variable's element count."""
    size = math.prod(shape)
    return sum("_foreach_" in event.name or any(
        s and not isinstance(s[0], list) and math.prod(s) == size
        for s in event.input_shapes)
        for event in torch_top_level_ops(optimizer, shape, record_shapes=True))


def count_hlo_kernels(hlo_text):
    """Instructions of the entry computation that run: fusions, copies, calls.

    Each is one launch at run time, whatever its size (`_NO_PASS` name values).
    """
    count = 0
    for line in entry_computation(hlo_text):
        match = _INSTRUCTION.match(line)
        count += bool(match) and match.group(3) not in _NO_PASS
    return count


def count_kernels(backend, optimizer, shapes):
    """Kernels one `apply` of `optimizer` launches on variables of `shapes`:
    XLA's (TensorFlow, JAX) or torch's dispatched operations. On a small
    model they, not memory, bound the step's time."""
    if backend == "torch":  # a `_foreach_*` call as one; a replayed graph's
        # operations one by one, as each is dispatched
        return len(torch_top_level_ops(optimizer, list(shapes)))
    hlo_of = {"jax": jax_apply_hlo, "tensorflow": tensorflow_apply_hlo}[backend]
    return count_hlo_kernels(hlo_of(optimizer, list(shapes)))


def count_passes(backend, optimizer, shape):
    """Passes over memory of one `apply` of `optimizer` on `backend`: XLA reads +
    writes (TensorFlow, JAX) or full-size kernels (torch); see the module docstring."""
    if backend == "torch":
        return torch_full_size_kernels(optimizer, shape)
    hlo_of = {"jax": jax_apply_hlo, "tensorflow": tensorflow_apply_hlo}[backend]
    return sum(count_hlo_passes(hlo_of(optimizer, shape), math.prod(shape)))


def main():
    import keras

    from keras_soaa import SOAA

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="1024,1024")
    parser.add_argument("--print-hlo", default=None, help="adam or soaa")
    args = parser.parse_args()
    shape = tuple(int(d) for d in args.shape.split(","))
    backend = keras.backend.backend()
    for name, make in (("adam", keras.optimizers.Adam),
                       ("soaa", lambda: SOAA(total_steps=10))):
        if args.print_hlo == name and backend != "torch":
            hlo_of = {"jax": jax_apply_hlo, "tensorflow": tensorflow_apply_hlo}
            print("\n".join(entry_computation(hlo_of[backend](make(), shape))))
        print(f"{backend} {name}: {count_passes(backend, make(), shape)} passes")


if __name__ == "__main__":
    main()
