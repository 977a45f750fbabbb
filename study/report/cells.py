"""How values read in the markdown: percentages, seconds, mean ± std, table rows."""

import math


def percent(value) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def seconds(value) -> str:
    return "–" if value is None else f"{value:.0f}"


def mean_std(mean, std) -> str:
    return percent(mean) + ("" if std is None else f" ± {100 * std:.1f}")


def cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def md_row(cells) -> str:
    return "| " + " | ".join(cell(c).replace("|", "\\|") for c in cells) + " |"


