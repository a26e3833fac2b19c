"""Which recorded cells `cells: "all"` means.

The original mapped "all" to a curated list per published recording (torchdeepretina/datas.py: CELLS, read at
commits 000dfeb and 507decb and in later versions): the cells it trained on and reported. A lab's config that says
"all" for those recordings must train on the same cells, so we keep the lists. For any other recording "all" is
the list stored in the file's root attribute `cells` when there is one, else every row of the response arrays
(as the original's later versions did for recordings missing from its table).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Row indices of the responses the original trained on when cells was "all", by recording (dataset folder).
ORIGINAL_CELLS: dict[str, tuple[int, ...]] = {
    "15-10-07": (0, 1, 2, 3, 4),
    "15-11-21a": (6, 10, 12, 13),
    "15-11-21b": (0, 1, 3, 5, 8, 9, 13, 14, 16, 17, 18, 20, 21, 22, 23, 24, 25),
    "16-01-07": (0, 2, 7, 10, 11, 12, 31),
    "16-01-08": (0, 3, 7, 9, 11),
    "16-05-31": (2, 3, 4, 14, 16, 18, 20, 25, 27),
    "20-09-15": (0, 1, 2),
    "arbfilt": tuple(range(10)),
}
FILE_ATTR = "cells"  # root attribute of an h5 recording that lists the rows "all" means


def all_cells(dataset: str, n_rows: int, file_cells: Sequence[int] | np.ndarray | None) -> tuple[list[int], str]:
    """The rows "all" means for recording `dataset` with `n_rows` response rows, and where that list came from."""
    if dataset in ORIGINAL_CELLS:
        return list(ORIGINAL_CELLS[dataset]), f"the original's list for {dataset} (datas.py: CELLS)"
    if file_cells is not None:
        return [int(c) for c in np.asarray(file_cells).ravel()], f"the file's '{FILE_ATTR}' attribute"
    return list(range(n_rows)), "every row of the recording"
