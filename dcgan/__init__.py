"""DCGAN models, training and evaluation (no Prefect here).

Large CPU tensors go on transparent huge pages: PyTorch's allocator reads THP_MEM_ALLOC_ENABLE
once, at the process's first allocation, so it is set on import, before any tensor exists.
A training step on the CPU allocates and frees about 100 MB of activations; on 4 KB pages it
spent up to a third of its time in page faults (docs/benchmarks.md). A value the user set wins;
where the kernel offers no huge pages the setting changes nothing.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
