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


# MS COCO as UniMatch's prepared masks hold it (81 classes): 0 is background, 1..80 are the 80
# annotated thing categories in increasing COCO category id, 255 is ignore. COCO numbers its
# categories 1..91 but annotates only 80 of them; the eleven ids without annotations (12 street
# sign, 26 hat, 29 shoe, 30 eye glasses, 45 plate, 66 mirror, 68 window, 69 desk, 71 door, 83
# blender, 91 hair brush) have no class. Category id COCO_CATEGORY_IDS[i] is class i + 1;
# data/README.md prints the whole table.
COCO_CATEGORY_IDS = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21,
    22, 23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44,
    46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65,
    67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
]
COCO_UNANNOTATED_IDS = [12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91]

COCO_CLASSES = [
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]

# COCO category id -> class index (background 0 -> 0).
COCO_ID_TO_CLASS = {0: 0, **{cid: i + 1 for i, cid in enumerate(COCO_CATEGORY_IDS)}}

# ADE20K (SceneParsing, ADEChallengeData2016), 150 classes. The annotation PNGs hold 0 for
# "other" (no class) and 1..150 for these; training uses class = value - 1 and ignores 0, as
# UniMatch V2 does (datasets.ade20k_lut).
ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
]


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
COCO_PALETTE = voc_palette(len(COCO_CLASSES))
ADE20K_PALETTE = voc_palette(len(ADE20K_CLASSES))

BUILTIN = {
    "pascal": (PASCAL_CLASSES, PASCAL_PALETTE),
    "cityscapes": (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE),
    "toy": (TOY_CLASSES, TOY_PALETTE),
    "coco": (COCO_CLASSES, COCO_PALETTE),
    "ade20k": (ADE20K_CLASSES, ADE20K_PALETTE),
}
