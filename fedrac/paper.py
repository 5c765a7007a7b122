"""The FedRAC paper's reported numbers (CVPR 2026 poster, Tables 1-9; ALGORITHMS.md §6) as data.

Tables 1-3: K = 10 clients, MLP, 3 runs, mean +/- sample std (ddof = 1, §1.4). Units as printed:
fairness = 100 x Pearson(s, theta); maximum test accuracy in %; rate = fraction of clients inside
the alpha-BCF bound (alpha = 0.5). Tables 4-9 (ablations on SVHN and CIFAR-10) are single numbers
without std; the FedRAC rows of Tables 4-9 repeat the means of Tables 1-3.

    >>> from fedrac import paper
    >>> paper.lookup("fairness", "fedrac", "cifar10", "pow")
    (99.41, 0.2)
    >>> paper.lookup("rate", "fedrac_wo_allocation", "svhn", "dir:3.0")
    (0.7, None)

Method keys are the simulator's registered names (``fedavg`` is the paper's FedAvg, i.e. the
CF-FedAvg protocol of §5.1); ``standalone`` is the Standalone row of Table 2 (= max over clients
of the standalone accuracies, §3.1).
"""
from __future__ import annotations

from typing import Optional

DATASETS = ("cifar10", "svhn", "emnist")
PARTITIONS = ("pow", "cla", "dir:3.0", "dir:7.0")
#: Column order of Tables 1-3: every dataset x every partition.
COLUMNS = tuple((d, p) for d in DATASETS for p in PARTITIONS)

METRICS = ("fairness", "max_accuracy", "rate")
TABLE_TITLES = {
    "fairness": "Table 1 - fairness (100 x Pearson(s, theta))",
    "max_accuracy": "Table 2 - maximum test accuracy (%)",
    "rate": "Table 3 - rate (alpha-BCF membership, alpha = 0.5)",
}

#: Registered name -> the name printed in the paper.
DISPLAY = {
    "standalone": "Standalone",
    "fedavg": "FedAvg",
    "cffl": "CFFL",
    "cgsv": "CGSV",
    "fedave": "FedAVE",
    "iafl": "IAFL",
    "fedsac": "FedSAC",
    "fedrac": "FedRAC",
    "fedrac_wo_reputation": "FedRAC w/o reputation",
    "fedrac_wo_allocation": "FedRAC w/o allocation",
    # not in the paper's tables
    "fedavg_plain": "FedAvg (global model)",
    "aequa": "Aequa-style",
    "fedpw": "FedPW (CF protocol)",
    "fedpw_plain": "FedPW (global model)",
    "heterofl": "HeteroFL",
    "fedrolex": "FedRolex",
    "fjord": "FjORD",
}

#: Methods of Tables 1-3 in the paper's row order (Standalone only in Table 2).
TABLE_METHODS = ("standalone", "fedavg", "cffl", "cgsv", "fedave", "iafl", "fedsac", "fedrac")
ABLATION_METHODS = ("fedrac_wo_reputation", "fedrac_wo_allocation")

# Rows as printed: 12 cells in COLUMNS order, "mean±std".
_TABLES_TEXT = {
    "fairness": {
        "fedavg": "-44.82±24.6 86.01±9.6 -0.84±2.1 28.26±15.1 -22.21±12.7 87.60±1.7 36.03±14.4 39.87±20.3 "
                  "-55.81±10.6 27.29±7.9 23.66±26.6 -16.76±16.8",
        "cffl": "91.35±2.6 97.77±1.1 77.19±1.3 51.23±3.2 93.14±0.8 97.46±1.1 44.84±3.8 85.54±4.3 "
                "87.02±3.2 95.15±1.6 75.14±0.9 78.79±2.6",
        "cgsv": "82.17±2.6 98.50±0.1 77.32±1.7 90.69±0.2 96.58±0.4 96.54±1.1 88.01±1.4 89.08±2.3 "
                "89.01±1.8 97.14±0.3 74.16±1.5 82.40±1.4",
        "fedave": "87.01±1.3 98.82±0.5 76.81±0.6 59.87±5.5 95.59±1.6 98.59±0.7 76.58±1.7 84.95±2.6 "
                  "91.05±2.1 98.12±0.5 75.66±3.3 82.77±0.6",
        "iafl": "96.90±1.6 99.32±0.1 88.68±0.6 93.50±3.5 98.90±0.5 99.55±0.1 97.16±1.4 85.28±2.9 "
                "88.94±2.1 98.31±0.1 56.90±1.2 85.53±0.6",
        "fedsac": "98.48±0.7 96.71±0.1 98.55±0.1 97.95±1.3 97.18±1.2 97.21±0.7 95.75±1.2 96.47±0.8 "
                  "98.23±0.5 97.77±0.7 90.88±1.2 93.86±0.7",
        "fedrac": "99.41±0.2 99.72±0.1 98.76±0.3 99.53±0.2 99.85±0.2 99.89±0.1 98.00±0.4 98.99±0.9 "
                  "98.90±0.5 99.25±0.2 94.29±0.8 94.24±0.6",
    },
    "max_accuracy": {
        "standalone": "40.85±0.3 36.34±0.3 31.43±0.1 38.89±0.2 68.13±0.3 58.95±0.2 61.23±0.1 63.20±0.1 "
                      "71.40±0.3 64.35±0.2 78.41±0.2 78.52±0.1",
        "fedavg": "49.10±0.7 42.66±0.5 51.53±0.2 52.32±0.2 78.64±0.1 75.17±0.4 81.46±0.6 81.77±0.6 "
                  "78.43±0.7 71.94±0.2 83.19±0.3 83.01±0.3",
        "cffl": "48.59±0.8 42.89±0.1 49.26±0.1 49.60±0.5 76.82±0.5 67.53±0.8 80.47±0.7 80.77±0.7 "
                "77.46±0.2 69.00±0.6 82.57±0.5 80.99±0.3",
        "cgsv": "48.04±0.6 43.37±0.3 49.91±0.1 52.22±0.4 78.13±0.2 71.89±1.1 78.08±0.9 81.36±0.9 "
                "77.81±0.8 75.53±0.4 81.69±0.5 82.56±0.7",
        "fedave": "48.53±0.1 42.53±0.3 52.76±0.2 50.81±0.9 77.80±0.2 64.24±0.9 71.85±0.5 79.62±0.9 "
                  "78.58±0.2 73.38±0.6 79.15±0.7 80.41±0.6",
        "iafl": "47.65±0.8 43.07±0.8 50.13±0.3 51.49±0.7 77.51±0.8 73.54±0.1 81.24±0.7 82.15±0.7 "
                "78.35±0.8 75.57±0.7 82.41±0.2 82.39±0.2",
        "fedsac": "48.63±0.6 43.07±0.8 52.91±0.2 51.60±0.3 78.71±0.3 73.28±0.5 79.63±0.2 80.39±0.4 "
                  "80.01±0.1 76.12±0.6 81.76±0.7 81.37±0.2",
        "fedrac": "49.37±0.3 44.28±0.2 53.14±0.3 54.71±0.2 79.18±0.2 76.89±0.1 82.71±0.3 82.43±0.4 "
                  "80.18±0.3 76.74±0.2 83.62±0.4 84.00±0.3",
    },
    "rate": {
        "fedavg": "0.33±0.21 0.10±0.00 0.10±0.00 0.23±0.12 0.10±0.00 0.10±0.00 0.20±0.10 0.17±0.12 "
                  "0.30±0.10 0.33±0.10 0.13±0.06 0.13±0.06",
        "cffl": "0.30±0.00 0.70±0.00 0.80±0.00 0.63±0.12 0.23±0.06 0.60±0.00 0.33±0.06 0.40±0.17 "
                "0.47±0.06 0.70±0.00 0.20±0.00 0.43±0.06",
        "cgsv": "0.33±0.06 0.87±0.06 0.80±0.00 0.57±0.21 0.40±0.00 0.47±0.06 0.60±0.26 0.37±0.21 "
                "0.40±0.10 0.13±0.06 0.20±0.00 0.33±0.06",
        "fedave": "0.30±0.00 0.73±0.06 0.50±0.00 0.67±0.12 0.37±0.06 0.67±0.06 0.33±0.06 0.30±0.00 "
                  "0.33±0.12 0.30±0.00 0.17±0.12 0.50±0.00",
        "iafl": "0.77±0.12 0.90±0.00 0.93±0.06 0.73±0.23 0.70±0.10 0.80±0.00 0.33±0.40 0.43±0.32 "
                "0.23±0.23 0.70±0.17 0.50±0.00 0.43±0.12",
        "fedsac": "1.00±0.00 0.97±0.06 1.00±0.00 1.00±0.00 1.00±0.00 0.93±0.06 0.97±0.06 0.97±0.06 "
                  "0.90±0.10 0.97±0.06 0.70±0.10 0.70±0.10",
        "fedrac": "1.00±0.00 0.97±0.06 1.00±0.00 1.00±0.00 1.00±0.00 1.00±0.00 0.97±0.06 1.00±0.00 "
                  "1.00±0.00 0.97±0.06 1.00±0.00 1.00±0.00",
    },
}

# Tables 4-9: (dataset, metric) -> variant -> values for POW, CLA, DIR(3.0), DIR(7.0).
_ABLATIONS_TEXT = {
    ("svhn", "fairness"): {"fedrac_wo_reputation": "99.62 99.66 95.87 97.01",
                           "fedrac_wo_allocation": "95.09 98.88 91.13 91.58",
                           "fedrac": "99.85 99.89 98.00 98.99"},
    ("svhn", "max_accuracy"): {"fedrac_wo_reputation": "73.42 70.17 74.58 70.56",
                               "fedrac_wo_allocation": "70.81 69.65 71.28 76.62",
                               "fedrac": "79.18 76.89 82.71 82.43"},
    ("svhn", "rate"): {"fedrac_wo_reputation": "1.00 1.00 0.70 1.00",
                       "fedrac_wo_allocation": "0.20 0.80 0.70 0.40",
                       "fedrac": "1.00 1.00 0.97 1.00"},
    ("cifar10", "fairness"): {"fedrac_wo_reputation": "99.06 99.51 88.17 98.81",
                              "fedrac_wo_allocation": "98.59 98.43 76.67 88.03",
                              "fedrac": "99.41 99.72 98.76 99.53"},
    ("cifar10", "max_accuracy"): {"fedrac_wo_reputation": "48.21 43.92 50.22 50.29",
                                  "fedrac_wo_allocation": "47.37 44.05 51.81 52.03",
                                  "fedrac": "49.37 44.28 53.14 54.71"},
    ("cifar10", "rate"): {"fedrac_wo_reputation": "0.5 0.8 1.0 1.0",
                          "fedrac_wo_allocation": "0.2 0.9 0.4 0.5",
                          "fedrac": "1.0 0.97 1.0 1.0"},
}
#: Which poster table holds each ablation block.
ABLATION_TABLE_NUMBER = {("svhn", "fairness"): 4, ("svhn", "max_accuracy"): 5, ("svhn", "rate"): 6,
                         ("cifar10", "fairness"): 7, ("cifar10", "max_accuracy"): 8, ("cifar10", "rate"): 9}


def _cell(text: str) -> tuple[float, Optional[float]]:
    text = text.replace("−", "-")
    if "±" in text:
        m, s = text.split("±")
        return float(m), float(s)
    return float(text), None


def _parse() -> tuple[dict, dict]:
    tables: dict = {}
    for metric, rows in _TABLES_TEXT.items():
        for method, row in rows.items():
            cells = row.split()
            if len(cells) != len(COLUMNS):
                raise AssertionError(f"paper table {metric}/{method}: {len(cells)} cells")
            for (d, p), c in zip(COLUMNS, cells):
                tables[(metric, method, d, p)] = _cell(c)
    ablations: dict = {}
    for (d, metric), rows in _ABLATIONS_TEXT.items():
        for method, row in rows.items():
            cells = row.split()
            if len(cells) != len(PARTITIONS):
                raise AssertionError(f"paper ablation {d}/{metric}/{method}: {len(cells)} cells")
            for p, c in zip(PARTITIONS, cells):
                ablations[(metric, method, d, p)] = _cell(c)
    return tables, ablations


#: (metric, method, dataset, partition) -> (mean, std or None), Tables 1-3.
TABLES, ABLATIONS = _parse()


def lookup(metric: str, method: str, dataset: str, partition: str) -> Optional[tuple[float, Optional[float]]]:
    """The paper's (mean, std) for a cell, or None when the paper has no such number.

    ``metric``: fairness | max_accuracy | rate; ``partition`` as the simulator writes it
    (``pow``, ``cla``, ``dir:3.0``, ``dir:7.0``). Tables 1-3 first, then the ablations (Tables 4-9).
    """
    key = (metric, method, dataset, partition)
    if key in TABLES:
        return TABLES[key]
    return ABLATIONS.get(key)


def display_name(method: str) -> str:
    return DISPLAY.get(method, method)


def column_label(dataset: str, partition: str) -> str:
    """Short column header as in the poster, e.g. ``C10 POW``, ``SVHN DIR3``, ``EMN CLA``."""
    d = {"cifar10": "C10", "svhn": "SVHN", "emnist": "EMN"}.get(dataset, dataset)
    p = partition.upper()
    if partition.startswith("dir:"):
        a = float(partition[4:])
        p = f"DIR{a:g}"
    return f"{d} {p}"


__all__ = ["DATASETS", "PARTITIONS", "COLUMNS", "METRICS", "TABLE_TITLES", "DISPLAY", "TABLE_METHODS",
           "ABLATION_METHODS", "TABLES", "ABLATIONS", "ABLATION_TABLE_NUMBER", "lookup", "display_name",
           "column_label"]
