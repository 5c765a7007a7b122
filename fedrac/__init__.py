"""fedrac: a simulator of FedRAC (CVPR 2026) and its baselines for submodel federated learning.

The simulator's parts live in submodules (``fedrac.data``, ``fedrac.partitions``, ``fedrac.models``,
...) and use only the public ``fedrac_kernels`` API for the hot server-side operations. See
docs/ARCHITECTURE.md for the module contracts.
"""

__version__ = "0.1.0"
