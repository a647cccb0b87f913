"""A network in the channels-last layout (oneDNN's faster 3-D convolutions on CPU) that still
returns contiguous logits.

A channels-last network's logits come out channels-last too ([D, H, W, C] in memory), and Triton
needs them C-contiguous: for a window of 105 x 96^3 that is a strided transposition of 371 MB. When
the output layer is a pointwise (1x1x1) convolution, as SegResNet's is, computing it as one matrix
product writes the logits contiguously instead: 3.41 -> 2.89 s per window on 2 CPU cores
(`python -m perf.network_forward`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class ContiguousPointwiseConv(nn.Module):
    """A 1x1x1 `nn.Conv3d` computed as weight @ features: contiguous output for any input layout."""

    def __init__(self, conv: nn.Conv3d) -> None:
        super().__init__()
        weight = conv.weight.detach()
        self.weight = nn.Parameter(weight.reshape(weight.shape[0], weight.shape[1]).contiguous(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        if x.is_contiguous(memory_format=torch.channels_last_3d):
            features = x.permute(0, 2, 3, 4, 1).reshape(batch, -1, channels).mT  # [B, C_in, voxels], a view
        else:
            features = x.reshape(batch, channels, -1)
        out = torch.matmul(self.weight.to(x.dtype), features)  # [B, C_out, voxels], contiguous
        if self.bias is not None:
            out += self.bias.to(x.dtype)[:, None]
        return out.reshape(batch, -1, *spatial)


def _is_pointwise(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv3d)
        and module.kernel_size == (1, 1, 1)
        and module.stride == (1, 1, 1)
        and module.padding == (0, 0, 0)
        and module.dilation == (1, 1, 1)
        and module.groups == 1
    )


def channels_last(network: nn.Module, example: torch.Tensor) -> nn.Module:
    """`network` (on its device) in channels_last_3d, its last convolution made to write contiguous logits.

    The replacement is checked on `example` (a small input the network accepts) against the
    unchanged channels-last network; where the last convolution is not pointwise, or the check
    fails, the network stays as it was and its logits are made contiguous by a copy.
    """
    network = network.to(memory_format=torch.channels_last_3d)
    convs = [(name, module) for name, module in network.named_modules() if isinstance(module, nn.Conv3d)]
    if not convs or not _is_pointwise(convs[-1][1]):
        log.info("the network's last convolution is not pointwise; its logits are made contiguous by a copy")
        return network
    name, conv = convs[-1]
    parent = network.get_submodule(name.rpartition(".")[0]) if "." in name else network
    attribute = name.rpartition(".")[2]
    with torch.inference_mode():
        expected = network(example.contiguous(memory_format=torch.channels_last_3d))
        setattr(parent, attribute, ContiguousPointwiseConv(conv).to(conv.weight.device))
        actual = network(example.contiguous(memory_format=torch.channels_last_3d))
    if not actual.is_contiguous() or not torch.allclose(actual, expected, rtol=1e-4, atol=1e-4):
        log.warning("computing %s as a matrix product changed the logits; keeping the convolution", name)
        setattr(parent, attribute, conv)
    return network
