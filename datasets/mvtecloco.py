"""MVTec LOCO: like MVTec AD, but each mask is a FOLDER ``<cls>/ground_truth/<type>/<name>/``.

Every image file in that folder (``000.png``, ``001.png``, ...) marks one
defect; the ground truth is their union. The validation split is not used.
"""
from .folder_layout import FolderLayout

LAYOUT = FolderLayout(title="MVTec LOCO", layout="mvtecloco", normal_type="good",
                      mask_pattern="ground_truth/{type}/{stem}/*")

list_samples = LAYOUT.list_samples
