"""qwen35_lab: look inside the Qwen3.5 / Qwen3.6 hybrid models.

>>> import qwen35_lab as ql
>>> lab = ql.load("tiny")               # an organism; or "Qwen/Qwen3.5-0.8B", or a local directory
>>> lab.chat([{"role": "user", "content": "Hello"}])
"""

from . import _logging

_logging.install()

from .configs import KNOWN_MODELS, build_random, config_for, estimate_weight_bytes
from .lab import ChatResult, Lab
from .loading import load

__all__ = [
    "KNOWN_MODELS",
    "ChatResult",
    "Lab",
    "build_random",
    "config_for",
    "estimate_weight_bytes",
    "load",
]
__version__ = "0.1.0"
