"""Inference: sampling the visual decoders (images, video) from visual embeddings."""

from emu2_engine.inference.decode import decode_images, decode_video, zero_image_embedding

__all__ = ["decode_images", "decode_video", "zero_image_embedding"]
