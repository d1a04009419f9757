from kart_lightning.data.datamodule import ImpalaDataModule
from kart_lightning.data.dataset import EpisodeDataset, TrajectoryDataset
from kart_lightning.data.pool import ActorFailed, ActorPool
from kart_lightning.data.weights import SharedWeights, WeightPublisher

__all__ = [
    "ActorFailed",
    "ActorPool",
    "EpisodeDataset",
    "ImpalaDataModule",
    "SharedWeights",
    "TrajectoryDataset",
    "WeightPublisher",
]
