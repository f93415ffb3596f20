"""No compression: the uncompressed reference row of every table."""

from dataclasses import dataclass

from methods import register
from methods.base import Compressor, VisualInput


@register
@dataclass
class NoCompression(Compressor):
    name = "none"
    stages = frozenset({"visual"})  # the identity, so it can stand wherever a visual stage does
    reference = True

    def compress(self, x: VisualInput):
        return x.features.flatten(0, 1)
