"""Data preparation from raw sources: ``python -m agree.prepare <step> key=value ...``.

Steps (one module each): ``karpathy`` (annotations and npz images from a Karpathy-split JSON),
``entities`` (textual entities with spaCy), ``ground`` (grounded entities and masked images with
an open-vocabulary detector), ``visual-genome`` (the VG entity bank and per-image object lists).
Heavy libraries (spaCy, transformers) are imported inside the steps that use them.
"""
