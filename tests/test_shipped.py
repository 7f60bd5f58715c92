"""The shipped demo pair behaves exactly as it did when it was trained and converted: same tokens, same scores.

tests/data/shipped_model_reference.npz was written from the pipeline of the code that trained the pair (before the
redesign that converted its files to the current checkpoint format): for one examples/ clip, the codec's tokens of
the degraded clip, the enhancer's predicted tokens, the codec's tokens of the clean clip and the copy-synthesis
scores of the clean clip.
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
