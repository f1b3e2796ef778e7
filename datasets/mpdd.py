"""MPDD: stored exactly like MVTec AD (see :mod:`datasets.mvtec`)."""
from dataclasses import replace

from . import mvtec

LAYOUT = replace(mvtec.LAYOUT, title="MPDD")

list_samples = LAYOUT.list_samples
