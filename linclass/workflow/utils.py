"""Small helpers of the classic assignment code: seeding and the toy two-layer net data."""

from __future__ import annotations

import random

import torch


def reset_seed(number: int) -> None:
    """Seed Python's and torch's random number generators."""
    random.seed(number)
    torch.manual_seed(number)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def get_toy_data(num_inputs: int = 5, input_size: int = 4, hidden_size: int = 10,
                 num_classes: int = 3, dtype: torch.dtype = torch.float32, device=None):
    """A tiny two-layer-net problem: (X, y, params), reseeding 0 first.

    params has W1 (input_size, hidden_size), b1, W2 (hidden_size, num_classes), b2 drawn
    in that order, then X = 10 * randn(num_inputs, input_size); y = [0, 1, 2, 2, 1].
    """
    device = default_device() if device is None else device
    reset_seed(0)
    params = {
        "W1": 1e-4 * torch.randn(input_size, hidden_size, device=device, dtype=dtype),
        "b1": torch.zeros(hidden_size, device=device, dtype=dtype),
        "W2": 1e-4 * torch.randn(hidden_size, num_classes, device=device, dtype=dtype),
        "b2": torch.zeros(num_classes, device=device, dtype=dtype),
    }
    X = 10.0 * torch.randn(num_inputs, input_size, device=device, dtype=dtype)
    y = torch.tensor([0, 1, 2, 2, 1], device=device, dtype=torch.int64)
    return X, y, params


def load_checkpoint(path, what: str):
    """torch.load(path) of tensors only, on the CPU; an unreadable file raises ValueError
    naming `what` and the first line of the reason."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unreadable file is the same error to the user)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read {what} from {path}: {reason}") from None
