"""Figure titles fit their panels: a long title wraps onto more lines instead of running off the edge."""

from __future__ import annotations

import cv2
import numpy as np

from dcgan.evaluation.figures import titled, wrap

FONT = cv2.FONT_HERSHEY_SIMPLEX


def test_a_long_title_wraps_to_fit_and_a_short_one_stays_on_one_line() -> None:
    grid = np.zeros((64, 200, 3), np.uint8)
    title = "champion: retrain-v2-20261206-081500 step 1800 against challenger: retrain-v3-20261207-030000 step 1800"
    lines = wrap(title, 196)
    assert len(lines) >= 2 and " ".join(lines) == title
    assert all(cv2.getTextSize(line, FONT, 0.35, 1)[0][0] <= 196 for line in lines)
    out = titled(grid, title)
    assert out.shape == (64 + 18 * len(lines), 200, 3)
    text_rows = out[: 18 * len(lines)]
    assert (text_rows[:, -3:] == 255).all()  # nothing drawn into the right edge: no clipped text
    assert titled(grid, "champion: run-a step 20").shape == (82, 200, 3)
