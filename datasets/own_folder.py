"""``--dataset folder``: your own images in the MVTec AD layout; the classes are the sub-folders of the root.

    <root>/<cls>/train/good/*                        normal training images
    <root>/<cls>/test/good/*, <root>/<cls>/test/<type>/*    test images
    <root>/<cls>/ground_truth/<type>/<name>_mask.png       masks of the anomalous test images

A few-shot folder (``<cls>/train/good`` only) is a valid training source when the
anomalies are synthetic (``--anomaly_source synthetic``).  A class whose anomalous
test images have no masks at all is evaluated on image metrics only (pixel
metrics left empty); a class where only some of them lack a mask is an error.
"""
from dataclasses import replace

from . import mvtec

NAME = "folder"
LAYOUT = replace(mvtec.LAYOUT, title="folder (MVTec layout)", masks_optional=True)

list_samples = LAYOUT.list_samples
