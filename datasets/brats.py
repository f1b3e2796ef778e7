"""BraTS as prepared by the ResAD authors: ``brain/test/{good,lesion}/*.jpg``, masks
``brain/ground_truth/lesion/<name>_mask.png``. Test split only.
"""
from .folder_layout import FolderLayout

LAYOUT = FolderLayout(title="BraTS", layout="brats", normal_type="good",
                      mask_pattern="ground_truth/{type}/{stem}_mask.png", has_train_split=False)

list_samples = LAYOUT.list_samples
