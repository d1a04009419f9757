"""A quiet console: the progress bar and our own sentences, not the notices of the libraries we use.

Each filter names one message and the module that emits it, so anything else still shows.
"""

import logging
import warnings


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_library_notices() -> None:
    """Filter the library notices a plain run would print: Lightning's advert for its logging
    product (lightning 2.6), its `[rank: 0] Received SIGTERM: 15` (CheckpointFiles says what it
    did about it), and torch's deprecation of LeafSpec, which Lightning's _pytree still calls
    (torch 2.13 with lightning 2.6); ours to read, not our users'."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropMessage("💡 Tip:"))
    logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").addFilter(
        _DropMessage("Received SIGTERM"))
    warnings.filterwarnings(
        "ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated",
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
