"""A plain PixArt diffusers directory (as a real PixArt-α/Σ checkpoint is stored) is conditioned by
precomputed caption embeddings placed beside it, and then runs through the same backbone interface."""
import pytest
import torch
from safetensors.torch import save_file


def _tiny_pixart_dir(tmp_path):
    from diffusers import PixArtTransformer2DModel

    net = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                   num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=16,
                                   caption_channels=12, norm_type="ada_norm_single", use_additional_conditions=False)
    d = tmp_path / "pixart"
    net.save_pretrained(d)
    return d


def test_plain_pixart_gets_caption_table_from_embeddings_file(tmp_path):
    from pipeline.models import load_backbone

    d = _tiny_pixart_dir(tmp_path)
    bare = load_backbone(d)
    assert bare.caption_table is None
    emb = torch.randn(4, 3, 12)  # 3 classes + the null caption, 3 tokens, 12 channels
    save_file({"caption_embeddings": emb}, str(d / "caption_embeddings.safetensors"))
    bb = load_backbone(d)
    assert bb.num_classes == 3
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.tensor([0, 2])
    with torch.no_grad():
        out = bb(x, t, y)
        ref = bb.net(x, encoder_hidden_states=emb[y], timestep=t,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert torch.equal(out, ref[:, :1])


def test_wrong_embedding_width_is_a_clear_error(tmp_path):
    from pipeline.models import load_backbone

    d = _tiny_pixart_dir(tmp_path)
    save_file({"caption_embeddings": torch.randn(4, 3, 7)}, str(d / "caption_embeddings.safetensors"))
    with pytest.raises(ValueError, match="caption_channels is 12"):
        load_backbone(d)
