"""lmedit: edit the knowledge inside causal language models and measure the result honestly."""

from lmedit.requests import EditRequest, Probe, RequestError

__version__ = "0.1.0"

__all__ = ["EditRequest", "Probe", "RequestError", "__version__"]
