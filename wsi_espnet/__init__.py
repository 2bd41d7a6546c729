"""wsi-espnet: ESPNet tissue segmentation of H&E whole-slide images, stitched into OME-Zarr."""

__version__ = "0.1.0"
