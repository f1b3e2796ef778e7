"""The DataLoader every loop uses (training, reference pools, evaluation, extraction)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, DistributedSampler

from datasets import AnomalyDataset, Sample
from models.extractor import FeatureExtractor
from utils.distributed import Ranks


def make_loader(samples: Sequence[Sample], extractor: FeatureExtractor, batch_size: int, num_workers: int,
                shuffle: bool = False, drop_last: bool = False, generator: Optional[torch.Generator] = None,
                persistent: bool = False, dataset_class: Callable[..., AnomalyDataset] = AnomalyDataset,
                ranks: Optional[Ranks] = None) -> DataLoader:
    """``persistent``: keep the worker processes between epochs (for loaders iterated many times;
    used on CUDA runs, where the GPU would otherwise wait for the workers' start-up every epoch).
    Batches go to pinned memory when CUDA is present, so ``.to(device, non_blocking=True)`` overlaps.
    ``dataset_class`` builds the dataset from the samples (e.g. a partial of
    :class:`datasets.anomaly_source.SyntheticAnomalyDataset`), pre-processed as ``extractor.resize`` says.
    ``ranks`` (several processes, shuffled): each rank reads its own share of every epoch, through a
    ``DistributedSampler`` seeded by ``generator``'s initial seed (call :func:`set_epoch` each epoch)."""
    dataset = dataset_class(list(samples), image_size=extractor.image_size, mean=extractor.mean, std=extractor.std,
                            resize=extractor.resize)
    # A loader draws its workers' base seed from its generator; giving every loader one keeps
    # the global random state untouched by evaluation, so a resumed run repeats an uninterrupted one.
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    sampler = None
    if ranks is not None and ranks.active and shuffle:
        sampler = DistributedSampler(dataset, num_replicas=ranks.world_size, rank=ranks.rank, shuffle=True,
                                     seed=generator.initial_seed(), drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, drop_last=drop_last,
                      sampler=sampler, num_workers=num_workers, generator=generator,
                      persistent_workers=persistent and num_workers > 0,
                      pin_memory=torch.cuda.is_available())



def set_epoch(loader: DataLoader, epoch: int) -> None:
    """A new shuffle of each rank's share every epoch (a loader without a distributed sampler: nothing to do)."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
