"""Datasets as normalised tensors (standard file formats, no download unless asked), label noise,
stratified splits, and differentiable siamese augmentation."""
from .datasets import DatasetSplits, ImageSet, from_tensors, from_torch_dataset, make_splits
from .loaders import DATASET_NAMES, load_dataset, read_idx
from .splits import add_label_noise, class_indices, stratified_split, stratified_subset

__all__ = ["ImageSet", "DatasetSplits", "DATASET_NAMES", "load_dataset", "from_tensors", "from_torch_dataset",
           "make_splits", "add_label_noise", "stratified_split", "stratified_subset", "class_indices", "read_idx"]
