"""oneDNN's Linear with the work around it done as it writes: the inference path of the CPU models.

Layer by layer, a Linear's bias, the activation after it and a residual added to it each read and write the whole
output once more. oneDNN applies them in its product's epilogue instead (`torch.ops.mkldnn._linear_pointwise`, what
torch.compile emits on a CPU). The modules that use it (ConvNeXt blocks, the conformers' grouped Linears) take this
path only where `applies` says so; training, CUDA, autocast and other precisions keep the layer-by-layer path, whose
results it matches within float rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # absent from builds without oneDNN
    linear_pointwise = torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
except (AttributeError, RuntimeError):
    linear_pointwise = None

ACTIVATIONS = {None: "none", "gelu": "gelu", "silu": "swish"}  # our names -> oneDNN's
# The same activations applied after a product, for the layer-by-layer path of a module that takes a name.
LAYER_BY_LAYER = {None: lambda y: y, "gelu": F.gelu, "silu": F.silu}


def applies(x: torch.Tensor) -> bool:
    """Whether a module may run on `x` with the fused Linear: float32 on a CPU, no autograd, no autocast."""
    return (linear_pointwise is not None and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           activation: str | None = None) -> torch.Tensor:
    """activation(x @ weight.T + bias): x (rows, in), weight (out, in) as nn.Linear holds it (any strides),
    activation None, "gelu" (exact) or "silu"."""
    return linear_pointwise(x, weight, bias, ACTIVATIONS[activation], [], "none")


def linear_add(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """residual + x @ weight.T + bias, residual (rows, out)."""
    return linear_pointwise.binary(x, residual, weight, bias, "add")
