"""What a command prints at the end of its work, for a person at a terminal: a run's summary, failure rows as a table.

The numbers come from `RunSummary` (schemas/summary.py) and the failure parts; nothing here reads storage.
"""

from __future__ import annotations

from typing import Any

TOP_REASONS = 5  # failure reasons the summary lists one per line; the rest are counted


def summary_lines(summary: Any) -> list[str]:
    """The end of a run on one screen: what was rendered, failures by reason (the most frequent first), where the
    report is, and what the exit code means (README, "Exit codes")."""
    out = summary.output.rstrip("/")
    lines = [f"{summary.images_rendered} rendered, {summary.images_already_done} already done, "
             f"{summary.images_failed} failed, {summary.invalid_rows} bad rows; "
             f"{summary.images_total_done}/{summary.images_expected} images in {summary.output}"]
    reasons = sorted(summary.failures_by_reason.items(), key=lambda item: (-item[1], item[0]))
    if reasons:
        lines.append(f"failures by reason (`fluxbatch failures {out}` lists each row):")
        lines += [f"  {count:>7}  {reason}" for reason, count in reasons[:TOP_REASONS]]
        if len(reasons) > TOP_REASONS:
            rest = sum(count for _, count in reasons[TOP_REASONS:])
            lines.append(f"  and {len(reasons) - TOP_REASONS} more reasons ({rest} failures)")
    if summary.images_without_watermark:
        count = summary.images_without_watermark
        lines.append(f"{count} image{'s' if count > 1 else ''} could not hold the watermark (flat colour, fine "
                     f"texture, a small image; JPEG and WebP lose more of it than PNG): written without it; "
                     f"`fluxbatch verify {out} --provenance` names them")
    if summary.candidates_rendered:
        lines.append(f"best-of-n: {summary.candidates_rendered} candidates rendered for the images kept")
    for name, score in summary.scores.items():
        lines.append(f"{name}: median {score['median']:.4g} (p10 {score['p10']:.4g}, p90 {score['p90']:.4g}) over "
                     f"{score['images']} images")
    groups = summary.near_duplicates.get("groups")
    if groups:
        lines.append(f"near-duplicates: {groups} group{'s' if groups > 1 else ''} of "
                     f"{summary.near_duplicates['images']} images (none deleted; the report lists them)")
    lines.append(f"report: {out}/report.html")  # a no-op re-run keeps the report of the run that rendered
    lines.append(summary.outcome())
    return lines


def failure_table(rows: list[dict[str, Any]]) -> str:
    """Rows as aligned columns: source, row, id, field, reason (a long reason runs past the last column)."""
    columns = ("source", "row", "id", "field", "reason")
    cells = [[("" if row[c] is None else str(row[c])) for c in columns] for row in rows]
    widths = [max(len(c), *(len(cell[i]) for cell in cells)) for i, c in enumerate(columns)]

    def line(cell: list[str]) -> str:
        return "  ".join([*(text.ljust(width) for text, width in zip(cell[:-1], widths)), cell[-1]])

    return "\n".join([line([c.upper() for c in columns])] + [line(cell) for cell in cells])
