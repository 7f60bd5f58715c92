"""Int8 dynamic quantisation of a token predictor (opt-in `--quantize`; CPU inference only).

torch.ao.quantization.quantize_dynamic only converts nn.Linear / nn.LSTM. The grouped modules hold G weight sets in
stacked tensors, which it does not recognise, so for a quantised model each group is unpacked into a standard
nn.Linear / nn.LSTM and those are quantised (fbgemm int8 kernels, per-output-channel weight scales, activations
quantised on the fly). The quantised modules cannot be trained or saved as a checkpoint.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from models import onednn
from models.conformer import GroupedBiLSTM, GroupedLinear

_INT8 = torch.ao.quantization.per_channel_dynamic_qconfig


def _quantize_dynamic(module: nn.Module, layer_type: type[nn.Module], inplace: bool = False) -> nn.Module:
    """torch.ao.quantization.quantize_dynamic of every `layer_type` in `module` to int8.

    torch 2.13 flags eager-mode quantisation as deprecated in favour of torchao (not a dependency here) but still
    ships and runs it; its warnings would only repeat that on every conversion, so they are silenced here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*", category=UserWarning)
        return torch.ao.quantization.quantize_dynamic(module, {layer_type: _INT8}, dtype=torch.qint8, inplace=inplace)


class QuantizedGroupedLinear(nn.Module):
    """Int8 dynamic-quantised stand-in for a GroupedLinear: one quantised nn.Linear per group."""

    def __init__(self, linear: GroupedLinear):
        super().__init__()
        groups, in_features, out_features = linear.weight.shape
        dense = nn.ModuleList(nn.Linear(in_features, out_features, bias=linear.bias is not None) for _ in range(groups))
        with torch.no_grad():
            for g, layer in enumerate(dense):
                layer.weight.copy_(linear.weight[g].t())
                if linear.bias is not None:
                    layer.bias.copy_(linear.bias[g, 0])
        self.per_group = _quantize_dynamic(dense.eval(), nn.Linear)

    def forward(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        """activation: applied to the output, as GroupedLinear takes it."""
        g, b, t, c = x.shape
        flat = x.reshape(g, b * t, c)
        y = torch.stack([layer(flat[i]) for i, layer in enumerate(self.per_group)]).view(g, b, t, -1)
        return onednn.LAYER_BY_LAYER[activation](y)


class QuantizedGroupedBiLSTM(nn.Module):
    """Int8 dynamic-quantised stand-in for a GroupedBiLSTM: one quantised bidirectional nn.LSTM per group."""

    def __init__(self, lstm: GroupedBiLSTM):
        super().__init__()
        input_size = lstm.weight_ih[0].shape[-1]
        dense = nn.ModuleList(nn.LSTM(input_size, lstm.hidden_size, lstm.num_layers, batch_first=True,
                                      bidirectional=True) for _ in range(lstm.groups))
        with torch.no_grad():
            for g, layer in enumerate(dense):
                # nn.LSTM's parameters come in the same order as GroupedBiLSTM.group_weights (layer, direction).
                for target, source in zip((w for ws in layer.all_weights for w in ws), lstm.group_weights(g)):
                    target.copy_(source)
        self.per_group = _quantize_dynamic(dense.eval(), nn.LSTM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([layer(x[i])[0] for i, layer in enumerate(self.per_group)])


def quantize_predictor(model: nn.Module) -> nn.Module:
    """Int8 dynamic quantisation of a token predictor's Linear and LSTM layers, grouped ones included.

    Converts `model` in place (convolutions, attention, norms and embeddings stay fp32) and returns it in eval mode.
    """
    model.eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GroupedLinear):
                setattr(parent, name, QuantizedGroupedLinear(child))
            elif isinstance(child, GroupedBiLSTM):
                setattr(parent, name, QuantizedGroupedBiLSTM(child))
    _quantize_dynamic(model, nn.Linear, inplace=True)
    return model
