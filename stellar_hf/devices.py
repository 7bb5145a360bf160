"""Device choice shared by the example scripts. Imports only torch, so a checkout's copy loads without the package."""

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """
    `torch.device(name)`, or for `"auto"` the first available of CUDA, Apple MPS and the CPU (torch's
    `torch.accelerator` on torch >= 2.6, which also knows XPU and other backends).
    """
    if name != "auto":
        return torch.device(name)
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return torch.device(accelerator.current_accelerator().type)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


__all__ = ["resolve_device"]
