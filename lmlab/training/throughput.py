"""Training throughput: tokens per second and model FLOPs utilisation (MFU), and the one table of device peaks.

MFU follows Chowdhery et al. 2022 (PaLM, arXiv 2204.02311, appendix B): the model's own training FLOPs per
token (``Backbone.flops_per_token(seq_len)``, forward + backward; plus what the objective runs beside the
model, a teacher's forward or a generator: ``LMModule.flops_per_token``) times the tokens processed per second,
divided by the device's dense peak for the precision the matmuls run in. Peaks are vendor datasheet
figures for dense (not 2:4-sparse) tensor-core math, in FLOP/s. A device that is not in ``PEAKS`` (every
CPU included) gets one warning and no MFU: never a made-up peak.
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from typing import Callable

import torch

T = 1e12
# (substring of torch.cuda.get_device_name(), {precision: dense peak FLOP/s}); the first match wins, so
# more specific names come first ("GH200" before "H200", "A100" before "A10", "L40S" before "L4").
PEAKS: list[tuple[str, dict[str, float]]] = [
    ("GH200", {"bf16": 989.4 * T, "fp16": 989.4 * T, "tf32": 494.7 * T, "fp32": 66.9 * T}),
    ("H200 NVL", {"bf16": 835.5 * T, "fp16": 835.5 * T, "tf32": 417.5 * T, "fp32": 60.0 * T}),
    ("H200", {"bf16": 989.4 * T, "fp16": 989.4 * T, "tf32": 494.7 * T, "fp32": 66.9 * T}),
    ("H100 PCIe", {"bf16": 756.5 * T, "fp16": 756.5 * T, "tf32": 378.0 * T, "fp32": 51.2 * T}),
    ("H100 NVL", {"bf16": 835.5 * T, "fp16": 835.5 * T, "tf32": 417.5 * T, "fp32": 60.0 * T}),
    ("H100", {"bf16": 989.4 * T, "fp16": 989.4 * T, "tf32": 494.7 * T, "fp32": 66.9 * T}),  # SXM (HBM3)
    ("B200", {"bf16": 2250.0 * T, "fp16": 2250.0 * T, "tf32": 1100.0 * T}),
    ("A100", {"bf16": 312.0 * T, "fp16": 312.0 * T, "tf32": 156.0 * T, "fp32": 19.5 * T}),
    ("L40S", {"bf16": 362.1 * T, "fp16": 362.1 * T, "tf32": 183.0 * T, "fp32": 91.6 * T}),
    ("L4", {"bf16": 121.0 * T, "fp16": 121.0 * T, "tf32": 60.0 * T, "fp32": 30.3 * T}),
    ("A10", {"bf16": 125.0 * T, "fp16": 125.0 * T, "tf32": 62.5 * T, "fp32": 31.2 * T}),
    ("RTX 4090", {"bf16": 165.2 * T, "fp16": 165.2 * T, "tf32": 82.6 * T, "fp32": 82.6 * T}),
    ("V100", {"fp16": 125.0 * T, "fp32": 15.7 * T}),
]
_warned: set[str] = set()


def matmul_precision(trainer_precision: str | int | None) -> str:
    """The dtype the matmuls run in for a Lightning ``precision`` setting: bf16, fp16, tf32 or fp32."""
    p = str(trainer_precision or "32")
    if "bf16" in p:
        return "bf16"
    if p.startswith("16"):
        return "fp16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def peak_flops(device: torch.device | str, precision: str = "bf16", name: str | None = None,
               warn: bool = True) -> float | None:
    """Dense peak FLOP/s of ``device`` for ``precision`` (bf16, fp16, tf32, fp32); ``None``, with one
    warning per device and precision, when the table does not know it. ``name`` overrides the device name
    (for tests)."""
    device = torch.device(device)
    if name is None:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    for pattern, peaks in PEAKS:
        if pattern in name and precision in peaks:
            return peaks[precision]
    key = f"{name}/{precision}"
    if warn and key not in _warned:
        _warned.add(key)
        warnings.warn(f"no {precision} peak known for device {name!r}: MFU is not logged (add the device's "
                      "dense peak to PEAKS in lmlab/training/throughput.py).", stacklevel=2)
    return None


class Throughput:
    """Tokens/s and MFU over a sliding window of the last ``window`` steps.

    Call ``step(tokens, seq_len)`` once per optimisation step (after it, so the wall-clock gap between calls
    is the step time); it returns the metrics to log (nothing until two steps have been seen). ``tokens``
    are this process's tokens; with ``world`` processes the logged tokens/s is the global rate (this
    process's rate times ``world``), MFU is per device. ``flops_per_token(seq_len)``: the training step's.
    """

    def __init__(self, flops_per_token: Callable[[int], float], peak: float | None, world: int = 1,
                 window: int = 20, clock: Callable[[], float] = time.perf_counter) -> None:
        self.flops_per_token, self.peak, self.world, self.clock = flops_per_token, peak, world, clock
        self.steps: deque[tuple[float, int, float]] = deque(maxlen=window + 1)  # (time, tokens, flops)
        self._fpt: dict[int, float] = {}

    def step(self, tokens: int, seq_len: int) -> dict[str, float]:
        if seq_len not in self._fpt:
            self._fpt[seq_len] = float(self.flops_per_token(seq_len))
        self.steps.append((self.clock(), tokens, tokens * self._fpt[seq_len]))
        if len(self.steps) < 2:
            return {}
        elapsed = self.steps[-1][0] - self.steps[0][0]
        if elapsed <= 0:
            return {}
        # the first entry only marks the start of the window: its own work happened before it
        tokens_done = sum(s[1] for s in list(self.steps)[1:])
        flops_done = sum(s[2] for s in list(self.steps)[1:])
        out = {"train/tokens_per_s": tokens_done / elapsed * self.world}
        if self.peak:
            out["train/mfu"] = flops_done / elapsed / self.peak
        return out
