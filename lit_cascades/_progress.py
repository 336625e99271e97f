"""Progress bars for the long loops a user waits on outside ``Trainer.fit`` (tokenising a corpus, scoring the
SALT_DS selection, generating records, encoding a retrieval corpus).

One tqdm bar on stderr; ``progress=False`` turns it off (tests, scripts that log elsewhere).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str, total: int | None = None, unit: str = "it",
                 progress: bool = True, **kwargs: Any) -> Any:
    """A ``tqdm`` bar over ``iterable`` (or a manual one with ``.update(n)`` when ``iterable`` is ``None``)."""
    from tqdm import tqdm  # not tqdm.auto: its notebook bar needs ipywidgets

    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not progress, file=sys.stderr,
                dynamic_ncols=True, leave=False, **kwargs)
