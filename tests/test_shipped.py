"""The shipped demo pair behaves exactly as recorded: same tokens, same scores, so no change of code alters what a
user gets from it without this file being rewritten on purpose.

tests/data/shipped_model_reference.npz holds, for one examples/ clip: the codec's tokens of the degraded clip, the
enhancer's predicted tokens, the codec's tokens of the clean clip (both through the inference pipeline) and the
copy-synthesis scores of the clean clip. It was first written by the code that trained the pair and held through
the redesign that converted the files; it was rewritten (`python tests/test_shipped.py --write`) when the pipeline
changed on purpose: input level normalisation (the tokens through the pipeline) and Griffin-Lim from the
integrated phase, 19 iterations in 2-s chunks instead of 32 from zero phase (the copy-synthesis scores). The
codec's tokens of the raw degraded clip did not change. It was rewritten again when a newly trained demo enhancer
was shipped (the predicted tokens), and when the codec's decoder was stored at float16 (the copy-synthesis scores:
PESQ 2.853 -> 2.832 on this clip, Griffin-Lim's sensitivity to the decoder's last digits; every token the same).
"""
from __future__ import annotations

import numpy as np
import torch

from conftest import REPO
from inference import Enhancer
from metrics import score_pair
from utils import load_audio

REFERENCE = REPO / "tests" / "data" / "shipped_model_reference.npz"


def test_shipped_pair_gives_the_stored_tokens_and_copy_synthesis_scores() -> None:
    reference = np.load(REFERENCE)
    clip = str(reference["clip"])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as inference.py runs: the groups as two concurrent tasks
    try:
        check_against(reference, clip)
    finally:
        torch.set_num_threads(threads)


def check_against(reference: np.lib.npyio.NpzFile, clip: str) -> None:
    enhancer = Enhancer.load(device="cpu").parallelize()
    degraded, _ = load_audio(REPO / "examples" / "degraded" / "noise" / clip, enhancer.sample_rate)
    with torch.inference_mode():
        degraded_tokens = enhancer.codec.encode(torch.from_numpy(degraded)[None])[0].numpy()
    np.testing.assert_array_equal(degraded_tokens, reference["degraded_tokens"])
    np.testing.assert_array_equal(enhancer.enhance(degraded).tokens, reference["predicted_tokens"])

    codec = Enhancer.load(device="cpu", codec_only=True).parallelize()
    clean, _ = load_audio(REPO / "examples" / "clean" / clip, codec.sample_rate)
    resynthesised = codec.enhance(clean)
    np.testing.assert_array_equal(resynthesised.tokens, reference["codec_tokens"])
    scores = score_pair(resynthesised.audio, clean, codec.sample_rate, dnsmos=False)
    assert abs(scores["pesq"] - float(reference["copy_synthesis_pesq"])) < 1e-3
    assert abs(scores["estoi"] - float(reference["copy_synthesis_estoi"])) < 1e-3


def write_reference() -> None:
    """Record what the shipped pair gives now (run on purpose, after a deliberate change of the pipeline)."""
    reference = dict(np.load(REFERENCE))
    clip = str(reference["clip"])
    torch.set_num_threads(2)
    enhancer = Enhancer.load(device="cpu").parallelize()
    degraded, _ = load_audio(REPO / "examples" / "degraded" / "noise" / clip, enhancer.sample_rate)
    with torch.inference_mode():
        reference["degraded_tokens"] = enhancer.codec.encode(torch.from_numpy(degraded)[None])[0].numpy()
    reference["predicted_tokens"] = enhancer.enhance(degraded).tokens
    codec = Enhancer.load(device="cpu", codec_only=True).parallelize()
    clean, _ = load_audio(REPO / "examples" / "clean" / clip, codec.sample_rate)
    resynthesised = codec.enhance(clean)
    reference["codec_tokens"] = resynthesised.tokens
    scores = score_pair(resynthesised.audio, clean, codec.sample_rate, dnsmos=False)
    reference["copy_synthesis_pesq"], reference["copy_synthesis_estoi"] = scores["pesq"], scores["estoi"]
    reference = {k: v.astype(np.int16) if k.endswith("tokens") else v for k, v in reference.items()}
    np.savez(REFERENCE, **reference)
    print(f"{REFERENCE}: copy-synthesis PESQ {scores['pesq']:.3f}, ESTOI {scores['estoi']:.3f}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_shipped.py --write  (rewrites the reference: after a deliberate change only)")
    write_reference()
