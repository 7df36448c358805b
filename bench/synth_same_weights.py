#!/usr/bin/env python3
"""A synthetic model whose matrices are one fixed set of float weights quantized to --type (gguf's
own quantizers), so that files of different types made with the same arguments hold the *same*
weights at different precisions: a Q4_0 draft of a Q8_0 or F16 target, for speculative decoding
with a draft model (`make_synth_model.py` alone writes random valid blocks, a different model per
type). Every other argument is make_synth_model.py's.

  bench/synth_same_weights.py OUT.gguf --type Q8_0 --preset tinyllama   # target
  bench/synth_same_weights.py OUT.gguf --type Q4_0 --preset tinyllama   # its draft
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "tools"))
import make_synth_model as synth  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import quantize  # noqa: E402

random_tensor = synth.tensor


def same_weights_tensor(rng, qtype, rows, cols, std):
    # The float draw is the same for every type (same generator state, same shape), so only the
    # final rounding differs between files.
    m, _ = random_tensor(rng, T.F32, rows, cols, std)
    if qtype == T.F32:
        return m, None
    if qtype == T.F16:
        return m.astype(np.float16), None
    return quantize(m, qtype), qtype


synth.tensor = same_weights_tensor
if __name__ == "__main__":
    synth.main()
