"""What entropy calibration cut off: a warning naming the tensors whose range clipped many of their values."""

from __future__ import annotations

from qtool.calibration.calibrate import CalibrationTable

# An entropy (KL) range that leaves out more than this fraction of a tensor's calibration values is
# worth a warning. Measured (bench/calibration.py's recipes, 16 calibration samples, u2netp 8, `entropy`),
# worst tensor per model: centerface 0.30 %, speech_embedding 0.13 %, digits_cnn 0.07 % (no warning);
# u2netp its input 1.71 %, ppocr_cls 9.3 % (5 tensors over 1 %; 14.1 dB against minmax's 20.3),
# ppocr_det 36 % (11 tensors over 1 %).
CLIPPED_WARNING = 0.01


def clipping_warnings(table: CalibrationTable, shown: int = 3) -> list[str]:
    """One warning when ranges calibrated with `entropy` clip more than CLIPPED_WARNING of some tensor's
    values (the observer summary's `clipped_fraction`), naming the `shown` worst with their clipped %;
    [] otherwise (other methods, tables without summaries)."""
    clipped = sorted(((r.summary.get("clipped_fraction") or 0.0, name) for name, r in table.ranges.items()
                      if r.method == "entropy"), reverse=True)
    worst = [(fraction, name) for fraction, name in clipped if fraction > CLIPPED_WARNING]
    if not worst:
        return []
    named = ", ".join(f"{name} {fraction * 100:.1f} %" for fraction, name in worst[:shown])
    more = f" and {len(worst) - shown} more" if len(worst) > shown else ""
    return [f"calibration.method entropy clipped more than {CLIPPED_WARNING * 100:g} % of the calibration values of "
            f"{len(worst)} tensor(s): {named}{more}; clipping outliers can cost more accuracy than it gains "
            "(ppocr_cls: 14.1 dB vs 20.3 dB with minmax): try calibration.method minmax or auto, or a "
            "calibration.overrides entry for these tensors"]
