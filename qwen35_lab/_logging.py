"""Quiet the one transformers warning that does not apply here.

transformers warns on every model that the Gated DeltaNet and causal-conv
functions fall back to PyTorch because flash-linear-attention / causal_conv1d
are not installed. qwen35_lab routes the instrumented paths through its own
ops (torch on CPU, Triton on CUDA), so the warning is noise in notebooks.
"""

import logging

_FALLBACK = "is falling back to its reference PyTorch implementation"


class _DropKernelFallbackWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _FALLBACK not in record.getMessage()


def install() -> None:
    for name in ("transformers.integrations.hub_kernels", "transformers"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKernelFallbackWarning) for f in logger.filters):
            logger.addFilter(_DropKernelFallbackWarning())
