import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("MPLBACKEND", "Agg")
# pytest-xdist runs one worker per core; the tests' tensors are tiny, so intra-op threads only contend.
torch.set_num_threads(1)
