"""MVTec 3D-AD, RGB images only: ``<cls>/{train,test}/<type>/rgb/*.png``, masks ``<cls>/test/<type>/gt/<name>.png``.

The point clouds (``xyz/``) and the validation split are not used.
"""
from .folder_layout import FolderLayout

LAYOUT = FolderLayout(title="MVTec 3D-AD", layout="mvtec3d", normal_type="good",
                      mask_pattern="test/{type}/gt/{stem}.png", image_subdir="rgb")

list_samples = LAYOUT.list_samples
