"""Which scaled-dot-product attention kernels a training step may use: decided here, once.

The trainer (``train.Trainer``, every step, forward and backward) and the GPU benchmark (which
times ``Trainer.run``) both go through ``training_attention``.

Why not let PyTorch choose: on an H200 with torch 2.11 / CUDA 13, PyTorch picks cuDNN's fused
attention for FLUX.1's bf16 shapes, and its *backward* fails on a LoRA step
(``mha_graph.execute(...).is_good()`` is false; without ``CUDA_LAUNCH_BLOCKING`` it surfaces later
as CUBLAS_STATUS_EXECUTION_FAILED or an illegal memory access, or as a NaN loss). The same step
passes with cuDNN attention switched off, with the math kernel, in fp32, or with no LoRA. So cuDNN
attention is left out of training; flash and memory-efficient attention (as fast on these shapes)
and the math kernel (always available, also on the CPU) remain, in PyTorch's order of preference.
The forward pass picks the kernel and its backward runs the same one, so the choice has to be in
force around the forward, the backward, and any recomputation under gradient checkpointing.

``attention`` (``TrainConfig.attention``) narrows it further when a model still misbehaves:
``"math"`` runs the reference kernel only (slowest, most memory, no fused kernel at all).
"""
from __future__ import annotations

from contextlib import contextmanager

DEFAULT = "auto"
CHOICES = {
    # FLASH_ATTENTION, EFFICIENT_ATTENTION, MATH: everything but cuDNN (see above).
    DEFAULT: ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
    "math": ("MATH",),
}


def backends(choice: str = "") -> tuple[str, ...]:
    """The ``torch.nn.attention.SDPBackend`` names a training step may use for ``choice`` ("" = auto)."""
    key = (choice or DEFAULT).strip().lower()
    if key not in CHOICES:
        from services.errors import InputError

        raise InputError(f"There is no attention setting called {choice!r}.",
                         hint=f"Use one of {', '.join(CHOICES)} (or leave it empty).")
    return CHOICES[key]


@contextmanager
def training_attention(choice: str = ""):
    """Inside: scaled-dot-product attention uses only ``backends(choice)``; the previous choice comes back after."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, name) for name in backends(choice)]):
        yield
