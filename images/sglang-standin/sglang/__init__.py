"""A STAND-IN for SGLang, not SGLang: the sglang-ha GPU image is built on it in CI.

It has the official image's layout (the engine in the system Python, run as root by
default) and a ``sglang.launch_server`` that checks its argv against SGLang's real
server flags, then serves the sglang-ha simulator. See images/sglang-standin/README.md.
"""

__version__ = "0.5.19+standin"
STANDIN = True
