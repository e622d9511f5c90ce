"""Datasets as normalised tensors (standard file formats, no download unless asked), label noise,
stratified splits, and differentiable siamese augmentation."""
from .datasets import (DATASET_NAMES, DatasetSplits, ImageSet, add_label_noise, class_indices, from_tensors,
                       from_torch_dataset, load_dataset, read_idx, stratified_split, stratified_subset)

__all__ = ["ImageSet", "DatasetSplits", "DATASET_NAMES", "load_dataset", "from_tensors", "from_torch_dataset",
           "add_label_noise", "stratified_split", "stratified_subset", "class_indices", "read_idx"]
