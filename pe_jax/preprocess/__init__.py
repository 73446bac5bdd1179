"""Model inputs exactly as the reference prepares them: the tokenizer, the image decoder and transform, video
frames. `from pe_jax.preprocess import get_text_tokenizer, get_image_transform, load_images`."""

from pe_jax.preprocess.image import ByteRange, decode_image, get_image_transform, image_batches, load_images
from pe_jax.preprocess.tiling import tile_image
from pe_jax.preprocess.tokenizer import clean_text, get_text_tokenizer
from pe_jax.preprocess.video import load_frames

__all__ = ["ByteRange", "clean_text", "decode_image", "get_image_transform", "get_text_tokenizer", "image_batches",
           "load_frames", "load_images", "tile_image"]
