"""The codecs and the token predictors, each built from its own config section (see models.codec)."""
from __future__ import annotations

from torch import nn

from models.codec import Codec, build_codec, build_from_section
from models.paragse import ParaGSE
from models.serial import SerialEnhancer

ENHANCERS = {"ParaGSE": ParaGSE, "SerialEnhancer": SerialEnhancer}


def build_enhancer(section: dict, codec: Codec) -> nn.Module:
    """A fresh token predictor from its config section, sized by the codec whose tokens it predicts."""
    if section.get("class") == "SerialEnhancer":
        return build_from_section(ENHANCERS, section, "enhancer", code_vectors=codec.code_vectors())
    return build_from_section(ENHANCERS, section, "enhancer", num_groups=codec.num_groups,
                              codebook_size=codec.codebook_size)


__all__ = ["Codec", "ENHANCERS", "ParaGSE", "SerialEnhancer", "build_codec", "build_enhancer"]
