"""Datasets for oodlab, by name: built-in offline sets and external local-root loaders.

``get_dataset("mnist", split="train", seed=0)`` returns an :class:`ImageDataset`;
``list_datasets()`` lists every name with its role (id / ood_test / ood_val / oe).
External sets return an :class:`ExternalImageDataset` with the same item contract.
"""

from oodlab.data.registry import default_cache_dir, get_dataset, list_datasets
from oodlab.data.types import DataError, DatasetEntry, DatasetNotFoundError, ImageDataset, Role


def __getattr__(name: str):
    """``ExternalImageDataset`` is imported lazily (its module pulls in torchvision on use)."""
    if name == "ExternalImageDataset":
        from oodlab.data.external import ExternalImageDataset

        return ExternalImageDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DataError",
    "DatasetEntry",
    "DatasetNotFoundError",
    "ExternalImageDataset",
    "ImageDataset",
    "Role",
    "default_cache_dir",
    "get_dataset",
    "list_datasets",
]
