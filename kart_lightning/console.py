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


def quiet_library_notices(subcommand: str | None = None) -> None:
    """Filter the library notices a plain run would print: Lightning's advert for its logging
    product (lightning 2.6), its `[rank: 0] Received SIGTERM: 15` (CheckpointFiles says what it
    did about it), its caution that an IterableDataset with `__len__` may mislead when several
    workers load it (the episodes of `test` and the evaluation are played in the main process,
    and `__len__` gives the progress bar its total), and, for `test` and `validate`, its notice
    that a checkpoint saved in another folder will not bring back ModelCheckpoint's top-k
    bookkeeping and its request for the callbacks the checkpoint's fit had (the Timer of a fit
    with `max_time`): they read the weights alone and save nothing; its note that the model
    summary sizes a bf16-mixed model in 32 bits (under mixed precision the weights are float32,
    so that size is right); and torch's deprecation of LeafSpec, which Lightning's _pytree still
    calls (torch 2.13 with lightning 2.6).
    Ours to read, not our users'."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropMessage("💡 Tip:"))
    logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").addFilter(
        _DropMessage("Received SIGTERM"))
    warnings.filterwarnings(
        "ignore", message=r"Your `IterableDataset` has `__len__` defined",
        module=r"lightning\.pytorch\.utilities\.data",
    )
    if subcommand in ("test", "validate"):
        warnings.filterwarnings(
            "ignore", message=r"The dirpath has changed from", module=r"lightning\.pytorch\.callbacks\.model_checkpoint",
        )
        warnings.filterwarnings(
            "ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint",
            module=r"lightning\.pytorch\.trainer\.call",
        )
    warnings.filterwarnings(
        "ignore", message=r"Precision .* is not supported by the model summary",
        module=r"lightning\.pytorch\.utilities\.model_summary\.model_summary",
    )
    warnings.filterwarnings(
        "ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated",
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
