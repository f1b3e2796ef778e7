"""Datasets for class-generalizable anomaly detection.

Layout modules (:mod:`.mvtec`, :mod:`.visa`, :mod:`.btad`, :mod:`.mvtec3d`,
:mod:`.mpdd`, :mod:`.mvtecloco`, :mod:`.brats`) list :class:`Sample` records;
:class:`AnomalyDataset` reads and pre-processes them; :mod:`.registry` knows
the class lists and the seen -> unseen settings; :mod:`.demo` draws the
offline demo dataset; :mod:`.fewshot` lists reference images.
"""
from .base import ANOMALOUS, IMAGENET_MEAN, IMAGENET_STD, NORMAL, AnomalyDataset, Sample
from .fewshot import list_fewshot_images
from .files import IMAGE_EXTENSIONS, is_image_file, list_image_files
from .image_io import open_image, read_image, read_mask
from .layout import LAYOUTS, detect_layout
from .registry import (CUSTOM, DATASETS, SETTINGS, DatasetInfo, Setting, custom_setting, dataset_classes,
                       evaluation_samples, get_dataset, get_setting, SettingSpec, training_samples)
from .demo import DEMO_SEEN, DEMO_UNSEEN, generate_demo_dataset

__all__ = [
    "ANOMALOUS", "AnomalyDataset", "CUSTOM", "custom_setting", "dataset_classes", "evaluation_samples", "SettingSpec", "DATASETS", "DEMO_SEEN", "DEMO_UNSEEN", "DatasetInfo",
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "LAYOUTS", "NORMAL", "SETTINGS",
    "Sample", "Setting", "detect_layout", "generate_demo_dataset", "get_dataset", "get_setting",
    "is_image_file", "list_fewshot_images", "list_image_files", "open_image", "read_image",
    "read_mask", "training_samples",
]
