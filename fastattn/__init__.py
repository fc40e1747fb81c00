"""fastattn: fused spatial attention and CBAM kernels for vision CNNs.

    import fastattn
    y = fastattn.spatial_attention(q, k, v, heads=8)      # (N, C, H, W) maps, flash-style
    block = fastattn.nn.CBAM(256)                         # fused CBAM, timm flavour
    model = fastattn.convert(timm_model)                  # swap timm's layers for fused ones
"""
from fastattn import nn  # noqa: F401
from fastattn import eager, twins  # noqa: F401
from fastattn._backend import BACKENDS, BackendUnavailable, explain  # noqa: F401
from fastattn._ext import LOAD_ERROR as _LOAD_ERROR, CompiledLibraryMissing, cpu_tuning  # noqa: F401
from fastattn.functional import cbam_apply, channel_pool, gated_spatial_pool, spatial_attention  # noqa: F401
from fastattn.convert import convert  # noqa: F401

__version__ = "0.1.0"


def __getattr__(name: str):
    # fastattn.reference, the tests' oracle, is imported on first use (`fastattn.reference.ref_...`),
    # not by `import fastattn`: no production path needs it
    if name == "reference":
        import importlib
        return importlib.import_module("fastattn.reference")
    raise AttributeError(f"module 'fastattn' has no attribute {name!r}")
