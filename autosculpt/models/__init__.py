from .vit import VisionTransformer, vit_tiny  # noqa: F401
