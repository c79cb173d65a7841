"""Class names for a classifier's outputs.

In order of precedence: TorchServe's ``index_to_name.json`` extra file (``{"0": "cat", …}`` or
``{"0": ["n02123045", "tabby"], …}``, the name being the last element), then, only for a head of
exactly 1000 outputs with nothing else given, the ImageNet-1k names shipped with camserve, else the
class indices as strings. The list always has one name per output, so no index is out of range.
"""

from __future__ import annotations

import csv
import json
from importlib import resources
from typing import List, Optional


def imagenet_class_names() -> List[str]:
    """The 1000 ImageNet-1k class names shipped with camserve, in class-index order."""
    text = resources.files("camserve").joinpath("data/imagenet_classes.tsv").read_text()
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    return [row["name"] for row in sorted(rows, key=lambda r: int(r["class_index"]))]


def read_index_to_name(path: str, num_classes: int) -> List[str]:
    """Names from an ``index_to_name.json``; every key must be an index in ``[0, num_classes)``.
    Indices the file does not name keep their number as the name. ``ValueError`` if ill-formed."""
    with open(path, encoding="utf-8") as f:
        try:
            mapping = json.load(f)
        except ValueError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
    if isinstance(mapping, list):
        mapping = {str(i): v for i, v in enumerate(mapping)}
    if not isinstance(mapping, dict):
        raise ValueError(f"{path}: expected an object {{\"0\": \"name\", …}}, got {type(mapping).__name__}")
    names = [str(i) for i in range(num_classes)]
    for key, value in mapping.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: key {key!r} is not a class index") from None
        if not 0 <= index < num_classes:
            raise ValueError(f"{path}: class index {index} is outside the model's {num_classes} outputs")
        if isinstance(value, (list, tuple)) and value:
            value = value[-1]
        if not isinstance(value, str):
            raise ValueError(f"{path}: the name of class {index} must be a string, got {value!r}")
        names[index] = value
    return names


def class_names(num_classes: int, index_to_name: Optional[str] = None) -> List[str]:
    """One name per output: the file's, else ImageNet's for 1000 outputs, else ``"0" … "n−1"``."""
    if index_to_name:
        return read_index_to_name(index_to_name, num_classes)
    if num_classes == 1000:
        return imagenet_class_names()
    return [str(i) for i in range(num_classes)]
