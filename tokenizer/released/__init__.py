"""Released tokenizers (OpenAI's DALL-E dVAE, BEiT v2's VQ-KD) behind mimflow's ``Tokenizer`` interface.

``importer.py`` reads the published checkpoints (without running code from them) and writes an ordinary
mimflow tokenizer directory; ``build_released`` rebuilds the model from that directory's config.
"""

from __future__ import annotations

from tokenizer.base import Tokenizer, TokenizerConfig


def build_released(config: TokenizerConfig) -> Tokenizer:
    if config.arch == "dall-e":
        from tokenizer.released.dalle import DalleDVAE

        return DalleDVAE(config)
    if config.arch == "beitv2":
        from tokenizer.released.beitv2 import BeitV2VQKD

        return BeitV2VQKD(config)
    raise ValueError(f"no released tokenizer with arch {config.arch!r}")
