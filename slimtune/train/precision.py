"""Compute precision of a run: the autocast context and, for fp16, the gradient scaler (saved for exact resume)."""

from __future__ import annotations

import contextlib

import torch


class Precision:
    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.dtype = dtype
        # fp16 needs loss scaling (its range is too small for small gradients); bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    @property
    def name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def state_dict(self) -> dict:
        return {} if self.scaler is None else {"grad_scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
