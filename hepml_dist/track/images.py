"""Figures as PNG images: a figure is drawn once, and every tracker stores the same bytes.

Drawing a matplotlib figure (mplhep style, mathtext) takes most of a second; the report and `hepml evaluate` send
each figure to up to three trackers (plots/, TensorBoard, Comet), so trackers take images (`log_image`) and
`log_figure` draws the figure once (`FigureAsImage`).
"""

import io
import struct
from typing import Any

DPI = 120


def figure_png(figure: Any, dpi: int = DPI) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's header (its IHDR chunk follows the 8-byte signature)."""
    width, height = struct.unpack(">II", png[16:24])
    return width, height


class FigureAsImage:
    """`log_figure` for trackers that store images: the figure drawn once as PNG, then `log_image`."""

    def log_image(self, name: str, png: bytes, step: int | None = None) -> None:
        raise NotImplementedError

    def log_figure(self, name: str, figure: Any, step: int | None = None) -> None:
        self.log_image(name, figure_png(figure), step)
