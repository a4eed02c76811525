"""Built-in class names and palettes (facts about the datasets, not code from any release).

Class index = position in the list. Palettes are RGB triples, used to colour
predictions and to write palette PNGs (the toy dataset writes its masks this way,
so they open in an image viewer and still decode to class indices with PIL).
"""

from __future__ import annotations

PASCAL_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
    "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
]

CITYSCAPES_PALETTE = [
    [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153],
    [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152],
    [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70],
    [0, 60, 100], [0, 80, 100], [0, 0, 230], [119, 11, 32],
]

TOY_CLASSES = ["background", "circle", "rectangle", "triangle", "blob", "ring"]

# Official Cityscapes labelIds 0..33 -> trainIds (19 evaluated classes); every other
# id, including the unlabeled/void ones, maps to the ignore value.
CITYSCAPES_ID_TO_TRAINID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}


def voc_palette(n: int = 256) -> list[list[int]]:
    """The PASCAL VOC colour map: class index bits spread over the high bits of R, G, B.

    It gives distinct colours for any number of classes up to 256, so it doubles as
    the generated palette for custom datasets.
    """
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append([r, g, b])
    return out


PASCAL_PALETTE = voc_palette(21)
TOY_PALETTE = voc_palette(len(TOY_CLASSES))

BUILTIN = {
    "pascal": (PASCAL_CLASSES, PASCAL_PALETTE),
    "cityscapes": (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE),
    "toy": (TOY_CLASSES, TOY_PALETTE),
}
