"""One autograd node per adapted layer: the frozen product and its LoRA, y = x W^T + b +
scale * (x A^T) B^T, computed and differentiated together.

peft runs an adapted layer as five autograd nodes (the frozen layer, down, up, the scaling and
the sum, with their views and transposes) and a 1x1 convolution's LoRA as two more
convolutions. A training step is bound by how many operations it dispatches, not by their
arithmetic (BENCHMARKS.md), so each adapted Linear and 1x1 Conv2d runs here as one node: three
products forward (the up product adds itself, scaled, into the output) and five backward (the
scale rides in the products: no multiplication of its own). A 1x1 convolution is the same
product over the channels of every pixel. The weights stay peft's modules: files, optimizer
and resume see the same parameters. Numbers differ from peft's only by rounding (the scaled sum
is one fused product here).
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

_FUNCTION: Any = None


def _lora_function() -> Any:
    """The autograd.Function (built on first use: torch stays out of the CLI's imports)."""
    global _FUNCTION
    if _FUNCTION is not None:
        return _FUNCTION
    import torch

    class LoraProduct(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
            # Every operand is cast to one dtype first: autocast (if on) then has nothing left
            # to cast, and the in-place sum it does not handle sees one dtype.
            dtype = (torch.get_autocast_dtype(x.device.type)
                     if torch.is_autocast_enabled(x.device.type) else weight.dtype)
            rows = x.reshape(-1, x.shape[-1]).to(dtype)
            weight, down, up = weight.to(dtype), down.to(dtype), up.to(dtype)
            out = (torch.addmm(bias.to(dtype), rows, weight.t()) if bias is not None
                   else torch.mm(rows, weight.t()))
            hidden = torch.mm(rows, down.t())
            out.addmm_(hidden, up.t(), alpha=scale)
            ctx.save_for_backward(rows, hidden, weight, down, up)
            ctx.scale = scale
            ctx.input_shape = x.shape
            return out.view(*x.shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
            rows, hidden, weight, down, up = ctx.saved_tensors
            grad = grad.reshape(-1, grad.shape[-1]).to(rows.dtype)
            # beta=0: the first operand only gives the shape (it is not read); the scale rides
            # in the product instead of a multiplication of its own
            grad_hidden = torch.addmm(hidden, grad, up, beta=0, alpha=ctx.scale)
            grad_up = torch.addmm(up, grad.t(), hidden, beta=0, alpha=ctx.scale)
            grad_down = torch.mm(grad_hidden.t(), rows)
            grad_x = None
            if ctx.needs_input_grad[0]:  # not for a first layer fed by frozen embeddings
                grad_x = torch.mm(grad, weight).addmm_(grad_hidden, down).view(ctx.input_shape)
            return grad_x, None, None, grad_down, grad_up, None

    _FUNCTION = LoraProduct
    return _FUNCTION


def lora_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """x W^T + b + scale * (x A^T) B^T over the last dimension of x (one autograd node).
    Under autocast the products run in its dtype; gradients come back in each input's dtype."""
    return _lora_function().apply(x, weight, bias, down, up, scale)


def _linear_forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if layer.merged or layer.disable_adapters or args or kwargs:
        return type(layer).forward(layer, x, *args, **kwargs)
    (name,) = layer.active_adapters
    base = layer.base_layer
    return lora_product(x, base.weight, base.bias, layer.lora_A[name].weight,
                        layer.lora_B[name].weight, layer.scaling[name])


def _pointwise_conv_forward(layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any,
                            ) -> torch.Tensor:
    if layer.merged or layer.disable_adapters or args or kwargs:
        return type(layer).forward(layer, x, *args, **kwargs)
    (name,) = layer.active_adapters
    base = layer.base_layer
    pixels = x.permute(0, 2, 3, 1)  # (N, H, W, C): a view; free when x is channels-last
    out = lora_product(pixels, base.weight.flatten(1), base.bias,
                       layer.lora_A[name].weight.flatten(1),
                       layer.lora_B[name].weight.flatten(1), layer.scaling[name])
    return out.permute(0, 3, 1, 2)


def _fusable(layer: Any) -> bool:
    """One plain LoRA adapter, no dropout, no DoRA: what our trainer injects."""
    from torch import nn

    names = list(layer.lora_A.keys())
    return (len(names) == 1 and list(layer.active_adapters) == names
            and isinstance(layer.lora_dropout[names[0]], nn.Identity)
            and not getattr(layer, "lora_variant", {}))


def fuse_adapters(model: nn.Module) -> int:
    """Run every adapted Linear and 1x1 Conv2d of `model` as one LoRA product (other layers,
    e.g. LoCon's 3x3 convolutions, keep peft's forward). Returns how many layers changed."""
    from peft.tuners.lora.layer import Conv2d, Linear

    changed = 0
    for module in model.modules():
        if isinstance(module, Linear) and _fusable(module):
            module.forward = types.MethodType(_linear_forward, module)
        elif (isinstance(module, Conv2d) and _fusable(module)
              and module.base_layer.kernel_size == (1, 1)
              and module.base_layer.stride == (1, 1) and module.base_layer.groups == 1
              and module.base_layer.padding in ((0, 0), "valid")):
            module.forward = types.MethodType(_pointwise_conv_forward, module)
        else:
            continue
        changed += 1
    return changed
