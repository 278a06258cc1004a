"""GPU families, their speed, and the price table (GPU type -> price per GPU-hour).

GPU names in the logs vary by memory size and board ('Tesla V100-SXM2-16GB',
'Tesla V100-SXM2-32GB-LS'); the chip is what sets the speed, so names are
folded into families and the family is what models and prices key on. The
trainer's runs on CPU (``gpu = "cpu"`` in its metrics.csv) are the family ``CPU``.
"""

from __future__ import annotations

import csv
import os
import re

# Peak FP32 TFLOPS from the vendor data sheets. Only the ratios matter: they
# give the time model a speed axis along which it can reach a GPU family it
# has not seen.
GPU_TFLOPS = {
    "K80": 4.1,
    "T4": 8.1,
    "P100": 9.3,
    "P40": 11.8,
    "V100-PCIE": 14.0,
    "V100-SXM2": 15.7,
    "A10G": 31.2,
    "A100": 19.5,
    # `disttrain train` on CPU writes gpu = "cpu". A nominal figure (a few cores' FP32 peak),
    # only a starting point on the speed axis: the family's speed correction, not shrunk towards
    # it (NO_DATA_SHEET), fits the user's own runs.
    "CPU": 1.0,
}

# Families whose figure above is nominal, not a data sheet: predicted only from their own runs
# (or a calibration), never from the speed axis alone. So is any device outside the table
# (device_family), at NOMINAL_TFLOPS.
NO_DATA_SHEET = ("CPU",)
NOMINAL_TFLOPS = 1.0

# Illustrative on-demand cloud prices in USD per GPU-hour; override with --prices.
DEFAULT_PRICES = {
    "P40": 1.00,
    "P100": 1.46,
    "V100-PCIE": 2.48,
    "V100-SXM2": 3.06,
}

# The largest price per GPU-hour taken (in any currency): beyond it a cost could overflow to inf.
MAX_PRICE = 1e12

_PATTERNS = [
    (r"V100.*SXM", "V100-SXM2"),
    (r"V100", "V100-PCIE"),
    (r"P100\b", "P100"),  # not a Quadro P1000
    (r"P40\b", "P40"),  # not a Quadro P4000
    (r"A100", "A100"),
    (r"A10G", "A10G"),
    (r"\bT4\b", "T4"),
    (r"K80", "K80"),
]


def gpu_family(name: str) -> str | None:
    """The family of a GPU name ('Tesla V100-SXM2-32GB-LS' -> 'V100-SXM2'), or None.

    Example::

        >>> gpu_family("Tesla P100-PCIE-16GB")
        'P100'
    """
    text = str(name).strip().upper()
    if text in {k.upper() for k in GPU_TFLOPS}:
        return next(k for k in GPU_TFLOPS if k.upper() == text)
    for pattern, family in _PATTERNS:
        if re.search(pattern, text):
            return family
    return None


def device_family(name) -> str | None:
    """The family of a run's or a configuration's device: a known GPU's family (gpu_family), else
    the name itself, stripped: a device outside the table (an H200 the logs predate, a renamed
    board), which has no data sheet here and is predicted from its own runs only (has_data_sheet).
    None for a missing or empty name.

    Example::

        >>> device_family("Tesla P40"), device_family(" NVIDIA H200 ")
        ('P40', 'NVIDIA H200')
    """
    family = gpu_family(name)
    if family is None and isinstance(name, str) and name.strip():
        return name.strip()
    return family


def has_data_sheet(family: str) -> bool:
    """Whether ``family`` has a data-sheet speed (GPU_TFLOPS, not nominal) that places it on the
    time model's speed axis without runs of its own."""
    return family in GPU_TFLOPS and family not in NO_DATA_SHEET


def read_prices(path: str | os.PathLike, notes: list | None = None) -> dict[str, float]:
    """Reads a price table: a CSV with columns ``gpu`` and ``price_per_gpu_hour``.

    Args:
        path: CSV file; ``gpu`` may be a family ('V100-SXM2'), a full name, or a device outside
            the table (device_family: priced, it is a candidate once runs on it are given).
        notes: if given, a line is appended for each name read as a family whose name it does
            not hold ('V100' and the typo 'V100-SMX2' are read as V100-PCIE).

    Returns:
        dict family -> price in currency units per GPU-hour.

    Raises:
        AdvisorInputError: missing file, missing columns, a row with more fields than the
            header, a price that is not a number in (0, MAX_PRICE], a row without a GPU name,
            or a family priced twice.
    """
    from .errors import AdvisorInputError

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # a spreadsheet's byte-order mark is not the header
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise AdvisorInputError(f"cannot read price file '{path}': {e.strerror}") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise AdvisorInputError(f"price file '{path}' is not a CSV: {e}") from None
    if not rows or not {"gpu", "price_per_gpu_hour"} <= set(rows[0].keys()):
        raise AdvisorInputError(
            f"price file '{path}' needs a header 'gpu,price_per_gpu_hour' and at least one row")
    prices: dict[str, float] = {}
    lines: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        if None in row:  # a field beyond the header's ('P40,1,5'): which one is the price?
            raise AdvisorInputError(f"price file '{path}' line {line}: more fields than the header's")
        family = device_family(row["gpu"] or "")
        if family is None:
            raise AdvisorInputError(f"price file '{path}' line {line}: no GPU name")
        try:
            price = float(row["price_per_gpu_hour"])
        except (TypeError, ValueError):
            price = float("nan")
        if not 0 < price <= MAX_PRICE:
            raise AdvisorInputError(
                f"price file '{path}' line {line}: price '{row['price_per_gpu_hour']}' is not a positive number "
                f"up to {MAX_PRICE:g}")
        if family in prices:  # 'P40' and 'Tesla P40' are one family: the later line silently won
            raise AdvisorInputError(
                f"price file '{path}' line {line}: GPU '{row['gpu']}' is family {family}, already priced on line "
                f"{lines[family]}")
        if notes is not None and family in GPU_TFLOPS and family.upper() not in row["gpu"].upper():
            notes.append(f"price file '{path}' line {line}: '{row['gpu'].strip()}' read as {family} "
                         f"(write the family's name to be sure)")
        prices[family] = price
        lines[family] = line
    return prices
