"""ImageNet-C summary numbers from top-1 tables: mean corruption accuracy, CE / mCE and relative CE / mCE.

All numbers are percentages. With E_{s,c} the top-1 error (100 - top-1) at severity s of corruption c, E_clean
the clean error, and `base` another model's (the baseline's) errors on the same corrupted images:

    CE_c          = 100 * sum_s E_{s,c} / sum_s E^base_{s,c}                            mCE = mean_c CE_c
    relative CE_c = 100 * sum_s (E_{s,c} - E_clean) / sum_s (E^base_{s,c} - E^base_clean)   relative mCE = mean_c
"""
from __future__ import annotations

import logging

log = logging.getLogger("mal")
#: results[corruption][severity] = {"top1": ..., ...}; severities are ints here, strings in robustness.json.
Results = dict[str, dict[int, dict[str, float]]]


def error(top1: float) -> float:
    return 100.0 - top1


def _ratio(num: float, den: float, what: str) -> float | None:
    if den == 0:
        log.warning("%s is undefined: the baseline's denominator is 0", what)
        return None
    return 100.0 * num / den


def _mean(values: list[float | None]) -> float | None:
    """Mean of the values, or None when any is undefined (a mean over part of the corruptions would mislead)."""
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def corruption_errors(results: Results, clean_top1: float, base: Results, base_clean_top1: float,
                      ) -> dict[str, dict[str, float | None]]:
    """CE_c and relative CE_c (%) of every corruption of `results` against the baseline's table `base`."""
    out = {}
    for c, per_sev in results.items():
        sev = sorted(per_sev)
        e = [error(per_sev[s]["top1"]) for s in sev]
        b = [error(base[c][s]["top1"]) for s in sev]
        rel_num = sum(x - error(clean_top1) for x in e)
        rel_den = sum(x - error(base_clean_top1) for x in b)
        out[c] = {"ce": _ratio(sum(e), sum(b), f"CE of {c}"),
                  "relative_ce": _ratio(rel_num, rel_den, f"relative CE of {c}")}
    return out


def summarize(results: Results, clean_top1: float, base: Results | None = None,
              base_clean_top1: float | None = None) -> dict:
    """Per-corruption means over severities, the mean corruption top-1 / error, and with a baseline CE, mCE,
    relative CE and relative mCE."""
    per = {c: {"top1": sum(r["top1"] for r in v.values()) / len(v)} for c, v in results.items()}
    for v in per.values():
        v["error"] = error(v["top1"])
    cells = [r["top1"] for v in results.values() for r in v.values()]
    out = {"per_corruption": per, "mean_corruption_top1": sum(cells) / len(cells),
           "mean_corruption_error": error(sum(cells) / len(cells)), "mce": None, "relative_mce": None}
    if base is not None:
        ces = corruption_errors(results, clean_top1, base, base_clean_top1)
        for c, v in ces.items():
            per[c].update(v)
        out["mce"] = _mean([v["ce"] for v in ces.values()])
        out["relative_mce"] = _mean([v["relative_ce"] for v in ces.values()])
    return out


__all__ = ["Results", "error", "corruption_errors", "summarize"]
