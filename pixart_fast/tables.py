"""Tables and numbers as the reports print them: aligned text for the terminal, markdown for summaries, and "-"
for a number that is missing.
"""


def fmt(value, spec: str) -> str:
    """`value` formatted with `spec` (format()'s mini-language), or "-" when it is None."""
    return "-" if value is None else format(value, spec)


def text_table(header, rows, right: bool = True) -> str:
    """Rows of strings under a header as aligned text, columns two spaces apart: the first column left-aligned,
    the others right-aligned (right) or left-aligned; no line ends in spaces."""
    cells = [list(header)] + [list(row) for row in rows]
    widths = [max(len(line[k]) for line in cells) for k in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if right and k else c.ljust(w) for k, (c, w) in
                               enumerate(zip(line, widths))).rstrip() for line in cells)


def markdown_table(header, rows) -> list[str]:
    """A markdown table as lines, then an empty line: each cell as str(), None as "-"."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join("-" if c is None else str(c) for c in row) + " |" for row in rows] + [""]
