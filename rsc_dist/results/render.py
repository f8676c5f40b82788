"""Tables as reports print them, from one description: Markdown, tidy CSV rows, LaTeX (booktabs).

A cell is a mean in percent with its spread over trial seeds: the sample standard deviation
("std", this project's per-run tables), or DomainBed's standard error ("se": its
collect_results.format_mean, ``np.std(x / sqrt(n))``, the population std over sqrt(n)). One
value has no spread (DomainBed prints 0.0 there; here no ± at all). Every table says what it
is: the protocol, the selection rule, the spread, and what the count in parentheses counts.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

ERRORS = {"std": "sample std", "se": "standard error (DomainBed: population std / sqrt(n))"}


def spread(values: list[float], error: str) -> float | None:
    """The spread of ``values`` as ``error`` (std | se) measures it; None for fewer than two."""
    if len(values) < 2:
        return None
    if error == "se":
        return statistics.pstdev(values) / math.sqrt(len(values))
    return statistics.stdev(values)


@dataclass(frozen=True)
class Cell:
    mean: float | None = None  # percent
    err: float | None = None  # the table's spread over seeds; None with fewer than two
    n: int = 0  # trial seeds
    note: str = ""  # printed instead of the count (e.g. why there is no spread)
    trials: str = ""  # trials compared for each seed's value ("20", "18-20"); "" when one run each

    @classmethod
    def of(cls, values: list[float], error: str = "std", trials: str = "") -> "Cell":
        if not values:
            return cls()
        return cls(statistics.fmean(values), spread(values, error), len(values), trials=trials)

    def count(self) -> str:
        """What the parentheses say: the seeds (x the trials each), a note, or nothing for a
        cell computed from other cells (an Avg of column means)."""
        if self.note:
            return self.note
        if not self.n:
            return ""
        return f"{self.n}x{self.trials}" if self.trials else str(self.n)

    def text(self, latex: bool = False) -> str:
        if self.mean is None:
            return "-"
        pm = r" $\pm$ " if latex else " ± "
        err = f"{pm}{self.err:.2f}" if self.err is not None else ""
        count = self.count()
        return f"{self.mean:.2f}{err} ({count})" if count else f"{self.mean:.2f}{err}"


def trials_text(counts: list[int]) -> str:
    """How many trials each seed's value was chosen from: "20", or "18-20" when they differ."""
    if not counts:
        return ""
    low, high = min(counts), max(counts)
    return str(low) if low == high else f"{low}-{high}"


@dataclass
class Table:
    title: str
    about: list[str]  # what the table is: protocol, selection rule, spread, what the count counts
    columns: list[str]
    rows: dict[str, dict[str, Cell]]  # row label -> column -> cell
    reference_rows: list[tuple[str, dict[str, float]]] = field(default_factory=list)  # published numbers
    first_column: str = "method"
    csv_fields: dict = field(default_factory=dict)  # constant columns of its CSV rows (dataset, metric, ...)
    key: str = ""  # its W&B key under results/
    selection: str = ""  # the rule, for W&B's summary (an oracle says so)
    extra: dict[str, dict[str, str]] = field(default_factory=dict)  # row -> column -> text, after the cells
    reference_source: str = "published"  # what the CSV calls the reference rows' source


def markdown(table: Table) -> str:
    extra_columns = _extra_columns(table)
    lines = [f"### {table.title}", ""] + [f"{line}  " for line in table.about] + [""]
    header = [table.first_column, *table.columns, *extra_columns]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---|" * (len(header) - 1)]
    for label, cells in table.rows.items():
        texts = [cells[c].text() if c in cells else "-" for c in table.columns]
        texts += [table.extra.get(label, {}).get(c, "") for c in extra_columns]
        lines.append(f"| {label} | " + " | ".join(texts) + " |")
    for label, values in table.reference_rows:
        lines.append(f"| {label} | " + " | ".join(f"{values[c]:.2f}" if c in values else "-" for c in table.columns)
                     + " |" + " |" * len(extra_columns))
    return "\n".join(lines) + "\n"


def latex(table: Table) -> str:
    """A booktabs table (\\usepackage{booktabs}) with the description as its caption."""
    extra_columns = _extra_columns(table)
    header = [table.first_column, *table.columns, *extra_columns]
    lines = [r"\begin{table}[ht]", r"\centering", r"\caption{" + _escape(table.title + ". " + " ".join(table.about))
             + "}", r"\begin{tabular}{l" + "c" * (len(header) - 1) + "}", r"\toprule",
             " & ".join(r"\textbf{" + _escape(h) + "}" for h in header) + r" \\", r"\midrule"]
    for label, cells in table.rows.items():
        texts = [cells[c].text(latex=True) if c in cells else "-" for c in table.columns]
        texts += [_escape(table.extra.get(label, {}).get(c, "")) for c in extra_columns]
        lines.append(" & ".join([_escape(label), *texts]) + r" \\")
    if table.reference_rows:
        lines.append(r"\midrule")
        for label, values in table.reference_rows:
            texts = [f"{values[c]:.2f}" if c in values else "-" for c in table.columns] + [""] * len(extra_columns)
            lines.append(" & ".join([_escape(label), *texts]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def latex_document(tables: list[Table], heading: str) -> str:
    """A standalone LaTeX file holding ``tables`` (as DomainBed's collect_results --latex writes)."""
    body = "\n".join(latex(t) for t in tables)
    return (r"\documentclass{article}" "\n" r"\usepackage{booktabs}" "\n" r"\begin{document}" "\n"
            + f"% {heading}\n" + body + r"\end{document}" + "\n")


CSV_FIELDS = ["table", "dataset", "metric", "protocol", "selection", "error", "source", "method", "column",
              "mean", "err", "n", "trials"]


def csv_rows(table: Table) -> list[dict]:
    """Tidy rows: one per (row, column), the table's cells, then its reference (published) numbers."""
    out = []
    for label, cells in table.rows.items():
        for column in table.columns:
            cell = cells.get(column, Cell())
            out.append({**table.csv_fields, "source": "runs", "method": label, "column": column,
                        "mean": "" if cell.mean is None else round(cell.mean, 4),
                        "err": "" if cell.err is None else round(cell.err, 4), "n": cell.n, "trials": cell.trials})
    for label, values in table.reference_rows:
        for column in table.columns:
            if column in values:
                out.append({**table.csv_fields, "source": table.reference_source, "method": label, "column": column,
                            "mean": values[column], "err": "", "n": "", "trials": ""})
    return out


def _extra_columns(table: Table) -> list[str]:
    return list(dict.fromkeys(c for cells in table.extra.values() for c in cells))


def _escape(text: str) -> str:
    """Plain text for LaTeX: its special characters escaped, ± as math."""
    text = text.replace("\\", "\0")  # a placeholder: the replacement's braces must stay unescaped
    for char in "&%$#_{}":
        text = text.replace(char, "\\" + char)
    for char, replacement in (("\0", r"\textbackslash{}"), ("±", r"$\pm$"), ("~", r"\textasciitilde{}"),
                              ("^", r"\^{}")):
        text = text.replace(char, replacement)
    return text
