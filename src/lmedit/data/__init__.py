"""Benchmark loaders and the packaged demo edit set."""

from lmedit.data.loaders import (
    DATA_FORMATS,
    KNOWEDIT_LOCALITY_GROUPS,
    KNOWEDIT_PORTABILITY_GROUPS,
    DataError,
    demo_path,
    detect_format,
    load_irrelevant_prompts,
    load_requests,
)

__all__ = [
    "DATA_FORMATS",
    "KNOWEDIT_LOCALITY_GROUPS",
    "KNOWEDIT_PORTABILITY_GROUPS",
    "DataError",
    "demo_path",
    "detect_format",
    "load_irrelevant_prompts",
    "load_requests",
]
