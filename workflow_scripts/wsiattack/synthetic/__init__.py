"""Synthetic H&E-like whole-slide images for the demo cohort.

The demo cohort lets the whole workflow run without real data. Each slide is a pyramidal, tiled,
JPEG-compressed RGB TIFF that OpenSlide opens with its ``generic-tiff`` reader (vendor
``generic-tiff``; ``openslide.mpp-x``/``-y`` come from the TIFF XResolution/YResolution tags).

The two classes differ only *locally*, like lymph-node metastasis detection: positive slides carry
2-4 small "tumour" regions (dense, large, dark nuclei on purplish stroma) covering
``tumor_share`` of the tissue; everything else (tissue amount and shape, stain, nucleus density)
is drawn from the same distributions for both classes. ``render_slide`` goes further: the tumour
is drawn from its own random stream, so the same generator state rendered with ``tumor=True``
and ``tumor=False`` gives images that are identical outside the tumour regions.

Colour model: Beer-Lambert optical density, ``I = I0 * exp(-(c_E * OD_E + c_H * OD_H))``, with
the eosin/haematoxylin OD vectors calibrated so that stroma comes out near RGB (230, 160, 190) and
a nucleus near (90, 60, 140). Mixing stains in OD space is what makes overlaps look like H&E. The
per-pixel work is two concentration maps and one lookup into a per-slide (c_E, c_H) -> RGB table,
which keeps a 5600 x 4480 slide to about a second on one core.

Everything is deterministic: same arguments -> byte-identical files (tifffile writes no DateTime
tag unless asked to and, with ``metadata=None``, no JSON ImageDescription).

Modules: ``fields`` (random fields, tissue and tumour masks, nuclei), ``render`` (staining and
composition into RGB), ``cohort`` (pyramidal TIFF and the demo cohort writer).
"""

from wsiattack.synthetic.cohort import ENCODER_TRAINING_STREAM, SAMPLE_COLUMNS, write_demo_cohort, write_pyramidal_tiff
from wsiattack.synthetic.render import RenderedSlide, render_slide, render_slide_with_masks

__all__ = [
    "ENCODER_TRAINING_STREAM",
    "SAMPLE_COLUMNS",
    "RenderedSlide",
    "render_slide",
    "render_slide_with_masks",
    "write_demo_cohort",
    "write_pyramidal_tiff",
]
