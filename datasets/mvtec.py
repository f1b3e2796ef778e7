"""MVTec AD: ``<cls>/train/good``, ``<cls>/test/<type>``, ``<cls>/ground_truth/<type>/<name>_mask.png``."""
from .folder_layout import FolderLayout

LAYOUT = FolderLayout(title="MVTec AD", layout="mvtec", normal_type="good",
                      mask_pattern="ground_truth/{type}/{stem}_mask.png")

list_samples = LAYOUT.list_samples
