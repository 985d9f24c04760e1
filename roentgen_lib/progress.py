"""Progress bars of the libraries we call, switched together (off in the tiny profile).

nbval compares a notebook's stderr, where progress bars go, so the tiny profile turns them off;
students on the demo profile keep them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def _switches() -> list[tuple]:
    """(is_disabled, enable, disable) for each library's progress bars."""
    import datasets
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    switches = [
        (datasets.are_progress_bars_disabled, datasets.enable_progress_bars, datasets.disable_progress_bars),
        (lambda: not diffusers_logging.is_progress_bar_enabled(), diffusers_logging.enable_progress_bar,
         diffusers_logging.disable_progress_bar),
        (lambda: not transformers_logging.is_progress_bar_enabled(), transformers_logging.enable_progress_bar,
         transformers_logging.disable_progress_bar),
        (hub_utils.are_progress_bars_disabled, hub_utils.enable_progress_bars, hub_utils.disable_progress_bars),
    ]
    return switches


def show_library_progress(enabled: bool) -> None:
    """Turn the datasets, diffusers, transformers and huggingface_hub progress bars on or off."""
    for _, enable, disable in _switches():
        (enable if enabled else disable)()


@contextlib.contextmanager
def library_progress_bars(enabled: bool) -> Iterator[None]:
    """The same switch for one block only, restoring each library's previous state afterwards."""
    was_disabled = [is_disabled() for is_disabled, _, _ in _switches()]
    show_library_progress(enabled)
    try:
        yield
    finally:
        for (_, enable, disable), disabled in zip(_switches(), was_disabled):
            (disable if disabled else enable)()
