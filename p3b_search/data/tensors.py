"""In-memory image tensors of the embedded tasks: scaling to the model's input and normalising."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def normalised_images(pixels: torch.Tensor, pixel_max: float, image_size: int,
                      mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(n, C, h, w)`` pixels in ``[0, pixel_max]`` (C = 1 or 3) -> normalised ``(n, 3, image_size,
    image_size)`` float32, resized (bilinear, no antialiasing) where ``image_size != h`` and grey
    repeated to 3 channels."""
    x = pixels.to(torch.float32) / pixel_max
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t).contiguous()
