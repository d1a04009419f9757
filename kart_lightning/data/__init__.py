from kart_lightning.data.datamodule import ImpalaDataModule
from kart_lightning.data.dataset import EpisodeDataset, TrajectoryDataset
from kart_lightning.data.pool import ActorFailed, ActorPool

__all__ = ["ActorFailed", "ActorPool", "EpisodeDataset", "ImpalaDataModule", "TrajectoryDataset"]
