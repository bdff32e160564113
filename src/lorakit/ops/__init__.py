"""Several adapters at once: per-row batches (:mod:`.per_row`), the resident adapter pool (:mod:`.pool`),
``modules_to_save`` copies per group of rows (:mod:`.saved_rows`), weighted combinations (:mod:`.combine`)."""

from . import saved_rows


def register() -> None:
    """Put ops' entries into core's tables (``modules_to_save`` rows under per-row adapters); idempotent."""
    saved_rows.register()
