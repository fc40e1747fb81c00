"""fastattn: fused spatial attention and CBAM kernels for vision CNNs."""
from fastattn import reference  # noqa: F401
from fastattn._ext import LOAD_ERROR as _LOAD_ERROR  # noqa: F401

__version__ = "0.1.0"
