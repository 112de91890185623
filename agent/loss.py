"""What ``Agent.observe(loss=...)`` accepts: any real scalar or tensor, as a 0-d float32 tensor, with no host sync."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def loss_tensor(loss: object) -> tuple[Tensor, str | None]:
    """The loss as a 0-d float32 tensor on its device, and a note when it had to be reduced.

    A tensor with several elements (an unreduced loss) gives its mean; a number too large
    for a float (``10**400``) gives ±inf, recorded as such. Anything that is not a real
    number or a real tensor raises ``TypeError`` naming the argument.
    """
    if isinstance(loss, Tensor):  # each op skipped here is one fewer on every step
        value = loss.detach()
        if value.is_complex():
            raise TypeError(f"loss must be a real tensor, got dtype {value.dtype}")
        value = value if value.dtype == torch.float32 else value.float()
        if value.dim() == 0:
            return value, None
        if value.numel() == 1:
            return value.reshape(()), None
        if value.numel() == 0:
            raise ValueError("loss is an empty tensor")
        return value.mean(), f"loss has shape {tuple(loss.shape)}: its mean is reported (pass a reduced loss)"
    if isinstance(loss, (str, bytes)) or not (hasattr(loss, "__float__") or hasattr(loss, "__index__")):
        raise TypeError(f"loss must be a tensor or a real number, got {type(loss).__name__}")
    try:
        number = float(loss)  # type: ignore[arg-type]
    except OverflowError:  # an int beyond float range
        number = math.inf if loss > 0 else -math.inf  # type: ignore[operator]
    return torch.tensor(number, dtype=torch.float32), None
