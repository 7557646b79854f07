"""Built-in models get their sizes from the data: classes, input channels and, for a ViT, the image
size its patch grid is built for (``autosculpt prune --model vit_tiny`` on the default 8×8 digits)."""
import torch

from autosculpt.models.pretrained import resolve_model


def test_vit_gets_the_datas_image_size_and_cnns_do_not():
    factory, meta = resolve_model("vit_tiny", 10, (1, 8, 8), {"patch_size": 2})
    vit = factory().eval()
    assert meta["model_args"]["image_size"] == 8 and vit.num_patches == 16
    assert vit(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    factory, meta = resolve_model("resnet20", 10, (3, 32, 32))
    assert "image_size" not in meta["model_args"] and factory()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    factory, meta = resolve_model("vit_tiny", 10, (1, 8, 8), {"image_size": 8, "patch_size": 4})  # given wins
    assert factory().num_patches == 4
