"""BTAD: ``<cls>/train/ok``, ``<cls>/test/{ok,ko}``, masks ``<cls>/ground_truth/ko/<name>.<bmp|png>``.

A mask has the same stem as its image, with any image extension.
"""
from .folder_layout import FolderLayout

LAYOUT = FolderLayout(title="BTAD", layout="btad", normal_type="ok",
                      mask_pattern="ground_truth/{type}/{stem}.*")

list_samples = LAYOUT.list_samples
