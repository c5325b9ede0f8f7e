"""The model page: the package's card, the operating points in force, its evaluation figures.

The card is the package's ``MODEL_CARD.md``, rendered by markdown-it-py with raw HTML off
(an HTML tag in it is shown as text) and its link checks on (no ``javascript:`` links): a
package is data from its maker, not code for the console's pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from markdown_it import MarkdownIt
from markupsafe import Markup
from starlette.requests import Request
from starlette.responses import Response

from dicomai.config import Settings
from dicomai.model.package import OperatingPoints
from dicomai.web.pages import Endpoint, render
from dicomai.web.state import Console, ModelInUse

__all__ = ["CARD_NAME", "PointsRow", "card_html", "figures", "model_page", "points_rows"]

#: The model card's file in a package.
CARD_NAME = "MODEL_CARD.md"

_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")


def card_html(text: str) -> Markup:
    """Markdown as HTML, raw HTML escaped and unsafe link schemes left as text."""
    return Markup(_MARKDOWN.render(text))  # noqa: S704 -- markdown-it escapes what it does not render


@dataclass(frozen=True)
class PointsRow:
    """The thresholds that grade images of some body parts, and where they come from."""

    applies_to: str
    points: OperatingPoints
    source: str


def points_rows(settings: Settings, loaded: ModelInUse) -> list[PointsRow]:
    """The operating points in force: per body part the site profile calibrated, then the rest."""
    m = settings.model
    overridden = [name for name, value in (("high-sensitivity", m.high_sensitivity),
                                           ("high-specificity", m.high_specificity)) if value is not None]
    profile = loaded.profile
    if profile is not None:
        source = (f"site profile ({profile.cases} cases, {profile.positives} fractured; "
                  f"by {profile.by}, {profile.created_at:%Y-%m-%d})")
    else:
        source = "model manifest"
    if overridden:
        source += f"; {' and '.join(overridden)} threshold set in the configuration"
    rows = [PointsRow(part, loaded.points_for(part), f"{source}, this body part's own")
            for part in sorted(profile.body_parts)] if profile is not None else []
    rows.append(PointsRow("other body parts" if rows else "all images", loaded.points_for(None), source))
    return rows


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _with_ci(block: dict[str, Any], key: str) -> str | None:
    value = _num(block.get(key))
    if value is None:
        return None
    ci = block.get(f"{key}_ci95")
    if isinstance(ci, list) and len(ci) == 2 and all(_num(c) is not None for c in ci):
        return f"{value:.3f} (95% CI {ci[0]:.3f} to {ci[1]:.3f})"
    return f"{value:.3f}"


def figures(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """The manifest's evaluation figures on its test split, as (figure, value) rows.

    A package made by another tool may lack any of them: what is missing is left out.
    """
    test = metrics.get("test")
    if not isinstance(test, dict):
        return []
    rows: list[tuple[str, str]] = []
    images, fractured = _num(test.get("images")), _num(test.get("fractured"))
    if images is not None:
        rows.append(("test images", f"{images:.0f}" + (f" ({fractured:.0f} fractured)" if fractured else "")))
    if (auroc := _with_ci(test, "auroc")) is not None:
        rows.append(("AUROC", auroc))
    for key, label in (("high_sensitivity", "high-sensitivity point"),
                       ("high_specificity", "high-specificity point")):
        block = test.get(key)
        if not isinstance(block, dict):
            continue
        threshold = _num(block.get("threshold"))
        name = f"{label} (threshold {threshold:.3f})" if threshold is not None else label
        for figure in ("sensitivity", "specificity", "precision"):
            if (shown := _with_ci(block, figure)) is not None:
                rows.append((f"{name}: {figure}", shown))
    if (ece := _num(test.get("calibration_error"))) is not None:
        rows.append(("expected calibration error", f"{ece:.3f}"))
    if (pointing := _with_ci(test, "pointing_game")) is not None:
        rows.append(("Grad-CAM pointing game (map maximum inside a fracture box)", pointing))
    return rows


def model_page(console: Console) -> Endpoint:
    """The model in use: its card, the thresholds grading images now, its test figures."""

    def endpoint(request: Request) -> Response:
        loaded = console.loaded
        if loaded is None:
            return render(console, request, "model.html", loaded=None)
        card_path = loaded.package.directory / CARD_NAME
        try:
            card: Markup | None = card_html(card_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            card = None
        manifest = loaded.package.manifest
        return render(console, request, "model.html", loaded=loaded, manifest=manifest, card=card,
                      points=points_rows(console.settings, loaded), figures=figures(manifest.metrics))

    return endpoint
