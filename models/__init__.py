"""The codecs and the token predictors, each built from its own config section (see models.codec)."""
from __future__ import annotations

from torch import nn

from models.codec import Codec, build_codec, build_from_section
from models.paragse import ParaGSE
from models.serial import SerialEnhancer
from utils import UserError

ENHANCERS = {"ParaGSE": ParaGSE, "SerialEnhancer": SerialEnhancer}


def build_enhancer(section: dict, codec: Codec) -> nn.Module:
    """A fresh token predictor from its config section, sized by the codec whose tokens it predicts."""
    if section.get("class") == "SerialEnhancer":
        return build_from_section(ENHANCERS, section, "enhancer", code_vectors=codec.code_vectors())
    extra = {}
    if section.get("token_branch", {}).get("copy_prior") is not None:
        if not hasattr(codec.quantizer, "group_codes"):
            raise UserError("enhancer.token_branch.copy_prior needs a codec with independent token groups "
                            f"({type(codec.quantizer).__name__} has none)")
        extra["group_codes"] = codec.quantizer.group_codes().detach()
    return build_from_section(ENHANCERS, section, "enhancer", num_groups=codec.num_groups,
                              codebook_size=codec.codebook_size, **extra)


__all__ = ["Codec", "ENHANCERS", "ParaGSE", "SerialEnhancer", "build_codec", "build_enhancer"]
