"""Numerical precision of a forward pass: `training.precision` -> torch.autocast, the same for training, validation,
evaluation and prediction; and whether a device can run a precision at all."""

import contextlib

import torch

from hepml_dist.errors import UserError

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}
CPU_FP16_NOTE = (
    "training.precision: fp16-mixed on CPU runs (autocast + GradScaler), but it is meant for testing the fp16 code "
    "path: CPU fp16 matmuls are slow and loss scaling buys nothing there; train on CPU in bf16-mixed or fp32"
)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast for `precision` on `device`'s type; a no-op context for fp32."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def unsupported_reason(device: torch.device, precision: str) -> str | None:
    """Why `device` cannot train in `precision` (None if it can): autocast must exist for the device type and run
    a small matmul in the precision's dtype; fp16 also needs a GradScaler for the device type."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return None
    if not torch.amp.is_autocast_available(device.type):
        return f"torch {torch.__version__} has no autocast for device type {device.type!r}"
    try:
        with torch.autocast(device_type=device.type, dtype=dtype):
            probe = torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
        if probe.dtype != dtype:
            return f"autocast on {device} computes matmuls in {probe.dtype}, not {dtype}"
        if precision == "fp16-mixed":
            torch.amp.GradScaler(device.type)
    except (RuntimeError, NotImplementedError, ValueError) as error:
        return f"{device} cannot run {precision}: {str(error).splitlines()[0]}"
    return None


def require_precision(device: torch.device, precision: str) -> None:
    """Refuse a precision the device cannot run, naming the field and what to use instead."""
    reason = unsupported_reason(device, precision)
    if reason:
        raise UserError(f"training.precision: {reason}; use fp32 (or bf16-mixed where supported) on this device")
