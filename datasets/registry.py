"""Dataset names, class lists and the seen -> unseen settings (docs/method.md §9.1, §9.2).

``DATASETS`` maps a dataset name (``--dataset``) to its classes and loader;
``SETTINGS`` maps a setting name (``--setting``) to its source (training) and
target (test) datasets. :func:`training_samples` and :func:`evaluation_samples` are
what the training and evaluation code call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from utils.errors import UserError

from . import brats, btad, demo, mpdd, mvtec, mvtec3d, mvtecloco, own_folder, visa
from .base import Sample
from .files import list_subfolders
from .layout import LAYOUTS, check_root

MVTEC_CLASSES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather",
                 "metal_nut", "pill", "screw", "tile", "toothbrush", "transistor", "wood",
                 "zipper")
VISA_CLASSES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
                "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum")
BTAD_CLASSES = ("01", "02", "03")
MVTEC3D_CLASSES = ("bagel", "cable_gland", "carrot", "cookie", "dowel", "foam", "peach",
                   "potato", "rope", "tire")
MPDD_CLASSES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate",
                "tubes")
MVTECLOCO_CLASSES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag",
                     "splicing_connectors")
BRATS_CLASSES = ("brain",)

TRAIN_DIR_FLAG = "--train_dataset_dir"
TEST_DIR_FLAG = "--test_dataset_dir"

ListSamples = Callable[..., list[Sample]]
"""``list_samples(root, class_name, split, hint)`` of a layout module."""


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset: its name, human title, classes, loader and on-disk layout.

    Attributes:
        name: the name used on the command line, e.g. ``"mvtec"``.
        title: the human name used in messages, e.g. ``"MVTec AD"``.
        classes: its class names, in the order results are reported.
        list_samples: ``list_samples(root, class_name, split, hint)``.
        layout: key of :data:`datasets.layout.LAYOUTS`.
    """

    name: str
    title: str
    classes: tuple[str, ...]
    list_samples: ListSamples
    layout: str

    @property
    def layout_description(self) -> str:
        """Short description of the expected folder layout, for error messages."""
        return LAYOUTS[self.layout].description


def _folder_dataset(name: str, module, classes: tuple[str, ...]) -> DatasetInfo:
    """The DatasetInfo of a layout module built on :class:`datasets.folder_layout.FolderLayout`."""
    return DatasetInfo(name, module.LAYOUT.title, classes, module.list_samples, module.LAYOUT.layout)


DATASETS: dict[str, DatasetInfo] = {info.name: info for info in (
    _folder_dataset("mvtec", mvtec, MVTEC_CLASSES),
    DatasetInfo("visa", visa.TITLE, VISA_CLASSES, visa.list_samples, "visa"),
    _folder_dataset("btad", btad, BTAD_CLASSES),
    _folder_dataset("mvtec3d", mvtec3d, MVTEC3D_CLASSES),
    _folder_dataset("mpdd", mpdd, MPDD_CLASSES),
    _folder_dataset("mvtecloco", mvtecloco, MVTECLOCO_CLASSES),
    _folder_dataset("brats", brats, BRATS_CLASSES),
    _folder_dataset("demo", demo, demo.DEMO_SEEN + demo.DEMO_UNSEEN),
    _folder_dataset(own_folder.NAME, own_folder, ()),  # classes: the sub-folders of its root
)}


@dataclass(frozen=True)
class Setting:
    """A class-generalization experiment: train on ``seen_classes`` of ``source``,
    test on ``unseen_classes`` of ``target``."""

    name: str
    source: str
    target: str
    seen_classes: tuple[str, ...]
    unseen_classes: tuple[str, ...]


def _cross_dataset(source: str, target: str) -> Setting:
    """Train on every class of ``source``, test on every class of ``target``."""
    return Setting(f"{source}_to_{target}", source, target,
                   DATASETS[source].classes, DATASETS[target].classes)


SETTINGS: dict[str, Setting] = {setting.name: setting for setting in (
    _cross_dataset("visa", "mvtec"),
    _cross_dataset("mvtec", "visa"),
    _cross_dataset("mvtec", "btad"),
    _cross_dataset("mvtec", "mvtec3d"),
    _cross_dataset("mvtec", "mpdd"),
    _cross_dataset("mvtec", "mvtecloco"),
    _cross_dataset("mvtec", "brats"),
    Setting("demo", "demo", "demo", demo.DEMO_SEEN, demo.DEMO_UNSEEN),
)}

CUSTOM = "custom"
"""``--setting custom``: source, target and classes come from their own flags."""


def get_dataset(name: str) -> DatasetInfo:
    """The dataset called ``name``; UserError listing the valid names otherwise."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def get_setting(name: str) -> Setting:
    """The setting called ``name``; UserError listing the valid names otherwise."""
    if name not in SETTINGS:
        raise UserError(f"unknown setting '{name}' (--setting); choose one of "
                        f"{', '.join(list(SETTINGS) + [CUSTOM])}")
    return SETTINGS[name]


def dataset_classes(name: str, root: str = "", hint: str = TRAIN_DIR_FLAG) -> tuple[str, ...]:
    """The classes of a dataset: its fixed list, or for ``folder`` the sub-folders of ``root``."""
    info = get_dataset(name)
    if name != own_folder.NAME:
        return info.classes
    check_root(root, hint)
    classes = tuple(list_subfolders(root))
    if not classes:
        raise UserError(f"{root} holds no class folders (expected <root>/<cls>/train/good, "
                        f"<cls>/test/<type>, <cls>/ground_truth/<type>/<name>_mask.png); check {hint}")
    return classes


@dataclass(frozen=True)
class SettingSpec:
    """A setting as asked for: a name of :data:`SETTINGS`, or ``custom`` with its datasets and classes
    (resolved against the dataset roots by :meth:`resolve`, which lists a ``folder`` root's classes)."""

    name: str
    source: Optional[str] = None
    target: Optional[str] = None
    seen_classes: Optional[tuple[str, ...]] = None
    unseen_classes: Optional[tuple[str, ...]] = None

    def resolve(self, train_root: str = "", test_root: str = "") -> Setting:
        if self.name != CUSTOM:
            return get_setting(self.name)
        return custom_setting(self.source, self.target, self.seen_classes, self.unseen_classes,
                              train_root, test_root)


def custom_setting(source: str, target: str, seen: Sequence[str] = None, unseen: Sequence[str] = None,
                   train_root: str = "", test_root: str = "") -> Setting:
    """Train on ``seen`` classes of ``source`` (default: all), test on ``unseen`` of ``target`` (default: all).

    Raises:
        UserError: a dataset missing or unknown, an unknown class, or a class on both sides.
    """
    for flag, value in (("--source_dataset", source), ("--target_dataset", target)):
        if not value:
            raise UserError(f"--setting custom needs {flag} (one of {', '.join(DATASETS)})")
        get_dataset(value)
    sides = {}
    for flag, dataset, chosen, root, hint in (("--seen_classes", source, seen, train_root, TRAIN_DIR_FLAG),
                                              ("--unseen_classes", target, unseen, test_root, TEST_DIR_FLAG)):
        available = dataset_classes(dataset, root, hint)
        unknown = [c for c in chosen or () if c not in available]
        if unknown:
            raise UserError(f"{flag}: unknown {dataset} class(es) {', '.join(unknown)}; choose from "
                            f"{', '.join(available)}")
        sides[flag] = tuple(dict.fromkeys(chosen)) if chosen else available
    both = [c for c in sides["--seen_classes"] if c in sides["--unseen_classes"]]
    if both:
        listed = ", ".join(both[:4]) + (f" and {len(both) - 4} more" if len(both) > 4 else "")
        raise UserError(f"class(es) {listed} both seen and unseen: the test classes must be new "
                        f"to the model; split them with --seen_classes / --unseen_classes")
    return Setting(CUSTOM, source, target, sides["--seen_classes"], sides["--unseen_classes"])


def _check_classes(info: DatasetInfo, classes: Sequence[str], root: str = "", hint: str = TRAIN_DIR_FLAG) -> None:
    available = dataset_classes(info.name, root, hint)
    unknown = [name for name in classes if name not in available]
    if unknown:
        raise UserError(f"unknown {info.title} class(es) {', '.join(unknown)}; choose from "
                        f"{', '.join(available)}")


def training_samples(dataset_name: str, root: str, classes: Sequence[str], stage: int,
                     hint: str = TRAIN_DIR_FLAG) -> list[Sample]:
    """The training samples of the SOURCE classes ``classes`` of a dataset.

    Stage 1: their normal training images. Stage 2: those plus ALL their test
    images, normal and anomalous with masks (as the authors' code does; the
    target dataset is never used for training).
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    info = get_dataset(dataset_name)
    _check_classes(info, classes, root, hint)
    splits = ("train",) if stage == 1 else ("train", "test")
    return [sample for class_name in classes for split in splits
            for sample in info.list_samples(root, class_name, split, hint)]


def evaluation_samples(dataset_name: str, root: str, class_name: str,
                       hint: str = TEST_DIR_FLAG) -> list[Sample]:
    """The test samples (normal and anomalous) of one class of a dataset."""
    info = get_dataset(dataset_name)
    _check_classes(info, [class_name], root, hint)
    return info.list_samples(root, class_name, "test", hint)

