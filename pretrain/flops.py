"""Model FLOPs of a pretraining step, and model-FLOPs utilisation (MFU).

Counted the usual way for MFU: multiply-adds of the matmuls and convolutions only (2 FLOPs each), the
backward pass costs twice the forward, nothing is counted for recomputation, the tokenizer (online
target) is not part of the model. ``tests/test_flops.py`` checks the forward count against
``torch.utils.flop_counter`` on the real model.
"""

from __future__ import annotations

from pretrain.model import ModelConfig

# Dense bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s, matched against
# ``torch.cuda.get_device_name()``; the most specific name first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)


def _block_flops(tokens: int, dim: int, mlp_ratio: float) -> int:
    hidden = int(dim * mlp_ratio)
    qkv_proj = 2 * tokens * dim * 3 * dim + 2 * tokens * dim * dim
    attention = 2 * 2 * tokens * tokens * dim  # scores and the weighted sum of values
    mlp = 2 * 2 * tokens * dim * hidden
    return qkv_proj + attention + mlp


def forward_flops_per_image(model: ModelConfig, img_size: int, out_dim: int, num_masked: int) -> int:
    """Forward FLOPs of ``MIMModel`` for one image: patch embedding, blocks, the head on masked patches.

    ``out_dim``: the head's width (the tokenizer's vocabulary, or ``3 * patch**2`` for pixels).
    """
    patches = (img_size // model.patch) ** 2
    tokens = patches + 1  # + [CLS]
    embed = 2 * patches * (3 * model.patch**2) * model.dim
    blocks = model.depth * _block_flops(tokens, model.dim, model.mlp_ratio)
    heads = 1
    if model.head == "v2":  # the [CLS] aggregation blocks see as many tokens, and share the head
        blocks += model.v2_blocks * _block_flops(tokens, model.dim, model.mlp_ratio)
        heads = 2
    return embed + blocks + heads * 2 * num_masked * model.dim * out_dim


def train_flops_per_image(model: ModelConfig, img_size: int, out_dim: int, num_masked: int) -> int:
    """Forward + backward (twice the forward): the numerator of MFU, per image."""
    return 3 * forward_flops_per_image(model, img_size, out_dim, num_masked)


def peak_tflops(device_name: str | None) -> float | None:
    """The dense bf16 peak of a known GPU, or None (CPU, or a GPU not in the table)."""
    if not device_name:
        return None
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def mfu(images_per_s: float, flops_per_image: float, peak: float) -> float:
    """Achieved model FLOP/s over the peak (``peak`` in TFLOP/s, per device; ``images_per_s`` per device)."""
    return images_per_s * flops_per_image / (peak * 1e12)


__all__ = ["PEAK_BF16_TFLOPS", "forward_flops_per_image", "mfu", "peak_tflops", "train_flops_per_image"]
