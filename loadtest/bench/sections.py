"""A markdown document as its `## ` sections: find one, replace or insert one, and replace one
scenario's rows of a summary table, so a run of some benchmarks updates only what it measured.

Scenario sections are headed `## N. Title`; a new one goes after those numbered below it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

SCENARIO_HEADING = re.compile(r"## (\d+)\. ")


def split_sections(text: str) -> list[str]:
    """The text cut before every `## ` heading; joining the parts gives the text back."""
    starts = [0, *(m.start() for m in re.finditer(r"^## ", text, flags=re.MULTILINE))]
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True) if b > a]


def find_section(parts: Sequence[str], heading: str) -> str | None:
    return next((p for p in parts if p.startswith(heading + "\n")), None)


def scenario_id(part: str) -> int | None:
    match = SCENARIO_HEADING.match(part)
    return int(match.group(1)) if match else None


def put_section(
    parts: list[str], section: str, heading: str, scenario: int | None, before: Sequence[str]
) -> None:
    """Replace the part with `heading` (or the section of scenario `scenario`); else insert
    it before the first scenario numbered above it or the first part headed by one of
    `before`, else at the end."""
    section = section.rstrip("\n") + "\n\n"
    for index, part in enumerate(parts):
        if part.startswith(heading + "\n") or (
            scenario is not None and scenario_id(part) == scenario
        ):
            parts[index] = section
            return
    for index, part in enumerate(parts):
        number = scenario_id(part)
        later = number is not None and scenario is not None and number > scenario
        if later or part.startswith(tuple(h + "\n" for h in before)):
            parts.insert(index, section)
            return
    parts.append(section)


def put_scenario_rows(parts: list[str], heading: str, scenario: int, rows: Sequence[str]) -> None:
    """In the table of the part with `heading`, whose rows are grouped by scenario (a group
    starts with a row whose first cell is `N. Title`), replace scenario `scenario`'s group
    with `rows`, or add it in number order."""
    for index, part in enumerate(parts):
        if not part.startswith(heading + "\n"):
            continue
        lines = part.rstrip("\n").split("\n")
        table = [i for i, line in enumerate(lines) if line.startswith("|")]
        if len(table) < 2:
            return
        head, body = lines[: table[1] + 1], lines[table[1] + 1 : table[-1] + 1]
        groups: list[tuple[int, list[str]]] = []
        for row in body:
            first = row.strip("|").split("|")[0].strip()
            if first:
                number = first.split(".")[0]
                groups.append((int(number) if number.isdigit() else 0, [row]))
            elif groups:
                groups[-1][1].append(row)
        groups = [g for g in groups if g[0] != scenario]
        groups.append((scenario, list(rows)))
        groups.sort(key=lambda g: g[0])
        merged = [row for _, group in groups for row in group]
        parts[index] = "\n".join([*head, *merged, *lines[table[-1] + 1 :]]) + "\n\n"
        return
