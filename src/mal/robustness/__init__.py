"""Robustness to common corruptions (ImageNet-C protocol): `mal eval --corruptions` (docs/robustness.md).

corruptions.py: the 15 corruptions of one image (optional extra `mal[robustness]`, imported lazily);
cache.py: the clean and corrupted test arrays on disk, made in parallel; metrics.py: mCE and relative mCE;
report.py: robustness.json / .csv / .png and the baseline's JSON; evaluate.py: the command itself.
"""
from .corruptions import (CORRUPTIONS, GROUPS, INSTALL_HINT, SEVERITIES, MissingExtraError, corrupt_image,
                          parse_corruptions, parse_severities)
from .metrics import corruption_errors, summarize

__all__ = ["CORRUPTIONS", "GROUPS", "SEVERITIES", "INSTALL_HINT", "MissingExtraError", "corrupt_image",
           "parse_corruptions", "parse_severities", "corruption_errors", "summarize"]
