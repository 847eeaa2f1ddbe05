import os
import sys

# The bit-for-bit references (tests/estimator_reference.py) were recorded with torch's AVX2 kernels; on a CPU with
# AVX-512 torch picks wider kernels whose reductions (logsumexp, softmax) round differently in the last bit. The
# suite pins AVX2 (a CPU without it keeps its own lower level), before torch is first imported.
os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("MPLBACKEND", "Agg")
# pytest-xdist runs one worker per core; the tests' tensors are tiny, so intra-op threads only contend.
torch.set_num_threads(1)
