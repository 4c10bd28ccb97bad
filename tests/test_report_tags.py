"""Box number tags in the inspect report never hide each other, even when boxes coincide."""

import numpy as np
from PIL import Image

from pipeline.report import images


def _overlap(a, b):
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_tags_of_coinciding_boxes_sit_side_by_side():
    boxes = [(50, 60, 200, 180)] * 4 + [(0, 0, 30, 30), (0, 0, 30, 30)]
    sizes = [(20, 18)] * 6
    tags = images.place_tags(boxes, sizes, 384, 256)
    assert tags[0] == (50, 42, 70, 60)  # the first: above the box's top-left corner
    assert tags[1] == (70, 42, 90, 60)  # the next: to its right along the same edge
    assert tags[4] == (0, 0, 20, 18)  # no room above: inside the box at its top edge
    for i, a in enumerate(tags):
        assert 0 <= a[0] and a[2] <= 384 and 0 <= a[1] and a[3] <= 256
        assert not any(_overlap(a, b) for b in tags[:i]), (i, tags)


def test_tags_fill_a_crowded_picture_without_overlap():
    boxes = [(300, 100, 320, 120)] * 30  # more tags than fit on the box's row
    tags = images.place_tags(boxes, [(20, 18)] * 30, 330, 200)
    assert all(not _overlap(a, b) for i, a in enumerate(tags) for b in tags[:i])


def test_every_tag_is_visible_in_the_annotated_picture():
    img = Image.new("RGB", (384, 256), (128, 128, 128))
    box = [0.2, 0.3, 0.6, 0.8]
    shown = np.asarray(images.annotate(img, [box, box, box]))
    for i in range(3):  # each tag is a filled block of its box's colour, not hidden
        colour = images.box_colour(i)
        pixels = int(np.all(shown == colour, axis=-1).sum())
        assert pixels > 150, (i, pixels)
