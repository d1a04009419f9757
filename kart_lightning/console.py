"""A quiet console: the progress bar and our own sentences, not the notices of the libraries we use.

Each filter names one message and the module that emits it, so anything else still shows.
"""

import logging
import warnings


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_library_notices() -> None:
    """Filter the library notices a plain run would print: Lightning's advert for its logging
    product (lightning 2.6), and torch's deprecation of LeafSpec, which Lightning's _pytree still
    calls (torch 2.13 with lightning 2.6); ours to read, not our users'."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropMessage("💡 Tip:"))
    warnings.filterwarnings(
        "ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated",
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
