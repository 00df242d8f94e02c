"""ONNX import: an ONNX graph as a pure, piecewise-linear-trackable JAX function.

``load(path)`` parses an ONNX model (the operator set that si4onnx supports for the
DAL models and its U-Net examples: Conv and ConvTranspose in 1-D, 2-D and 3-D,
Relu/LeakyRelu, BatchNormalization, pooling, Resize, Concat, Split, element-wise
arithmetic, Gemm/MatMul, shape operators, RandomNormal(Like) with a seed, ...; see
``SUPPORTED_OPS``) into an :class:`OnnxFunction`: a JAX pytree whose children are the
float weights and whose static auxiliary data is the parsed graph. Every operator is
written with plain ``jax.numpy``/``lax`` operations that :func:`sijax.track` follows
(matrix products, convolutions, slices, pads, concatenations, reduce-windows, max),
so an imported network can be tested with the DAL test exactly like a native one.
Layout is NCHW, as in ONNX, at the function's inputs and outputs; inside, 2-D
convolution outputs stay channels-last (:class:`sijax.onnx.layout.ChannelsLast`).

Calling convention: ``fn(*inputs, **named)`` takes the graph's inputs in the order of
``fn.input_names`` (positionally, by name, or both: the first ones by position) and
returns one array for a single-output graph, else a tuple in the order of
``fn.output_names``. A random draw (RandomNormal(Like)) is sijax's own, fixed by the
node's seed (NumPy's legacy stream, as ``onnx.reference``; not onnxruntime's or
PyTorch's numbers), and a constant for the tracker.

The ``onnx`` package is an optional dependency (``pip install sijax[onnx]``); it is
imported inside :func:`load` only, so ``import sijax`` works without it.

The modules, one concern each (the names here are the public API): ``graph`` (the
static graph), ``function`` (:class:`OnnxFunction`), ``layout`` (channels-last
tensors), ``operators``, ``linalg``, ``pooling`` and ``resize`` (the operator
implementations), ``dispatch`` (running one node), ``reader`` (:func:`load`).

Example::

    fn = sijax.onnx.load("unet.onnx")            # float64 weights (needs x64)
    y = jax.jit(lambda f, x: f(x))(fn, x)        # fn crosses jit as an argument
    piece = sijax.track(lambda x: fn(x))(a, b, z)
"""

from sijax.errors import UnsupportedOperatorError
from sijax.onnx.dispatch import SUPPORTED_OPS
from sijax.onnx.function import OnnxFunction
from sijax.onnx.reader import load

__all__ = ["OnnxFunction", "UnsupportedOperatorError", "load", "SUPPORTED_OPS"]
