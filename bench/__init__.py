"""FedCart benchmarks: every figure a ratio against a baseline measured in the same run.

Single-threaded throughout (one core is what a phone gives the model, and what makes the
comparison fair), so the thread pools are pinned before numpy is imported.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
