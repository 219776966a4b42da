"""Tiny random-weight diffusers pipelines of the five kinds this field quantizes, saved with diffusers' own
``save_pretrained`` (the directory layout of a Hugging Face snapshot): the stand-ins the tests and the
miniature end-to-end run use, since no real weights can be downloaded here.

=============  ======================  ===========================  =========================================
kind           diffusers pipeline      denoiser                     conditioning / autoencoder
=============  ======================  ===========================  =========================================
``ddpm``       DDPMPipeline            UNet2DModel (pixel, 3x16x16)  none
``ldm``        LDMPipeline             UNet2DModel (latent 3x8x8)   none; VQModel (x2)
``dit``        DiTPipeline             DiTTransformer2DModel        class (1000 + null), learned sigma; KL (x2)
``pixart``     PixArtAlphaPipeline     PixArtTransformer2DModel     text (T5, attention mask); KL (x2)
``sd``         StableDiffusionPipeline UNet2DConditionModel         text (CLIP); KL (x2)
=============  ======================  ===========================  =========================================

The tokenizers are built in memory from a word list (:data:`WORDS`), so no vocabulary file is needed.
Every builder takes a seed and gives bit-identical weights for the same seed.

Run ``python -m pipeline.tiny_pipelines OUT_DIR`` to write all five (and ``prompts.txt``) under OUT_DIR.
"""
from __future__ import annotations

import sys
from pathlib import Path

KINDS = ("ddpm", "ldm", "dit", "pixart", "sd")
WORDS = ("a", "handwritten", "digit", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
         "nine", "photo", "of", "cat", "dog", "red", "blue", "car")
PROMPTS = ("a handwritten seven", "a photo of a cat", "a red car", "a blue dog")


def _t5_tokenizer():
    from transformers import T5Tokenizer

    # a unigram vocabulary: the three special pieces first (pad 0, eos 1, unk 2, as T5's), then "▁word" pieces
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"\u2581{w}", -float(i + 1)) for i, w in
                                                            enumerate(WORDS)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in WORDS:
        vocab.setdefault(f"{w}</w>", len(vocab))
    for ch in "abcdefghijklmnopqrstuvwxyz":  # characters, so any lower-case word still tokenizes
        vocab.setdefault(f"{ch}</w>", len(vocab))
        vocab.setdefault(ch, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32)


def _kl_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16)


def build(kind: str, seed: int = 0):
    """The diffusers pipeline object of ``kind`` (one of :data:`KINDS`) with random weights from ``seed``."""
    import torch
    import diffusers as d

    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    torch.manual_seed(seed)
    ddim = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if kind == "ddpm":
        unet = d.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                             layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                             up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
        return d.DDPMPipeline(unet=unet, scheduler=d.DDPMScheduler(num_train_timesteps=1000, clip_sample=True))
    if kind == "ldm":
        unet = d.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                             layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                             up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
        vq = d.VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                       latent_channels=3, num_vq_embeddings=32, norm_num_groups=4, sample_size=16)
        return d.LDMPipeline(vqvae=vq, unet=unet, scheduler=d.DDIMScheduler(**ddim))
    if kind == "dit":
        net = d.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                      num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                      norm_type="ada_norm_zero")
        return d.DiTPipeline(transformer=net, vae=_kl_vae(), scheduler=d.DDIMScheduler(**ddim),
                             id2label={i: f"class {i}" for i in range(1000)})
    if kind == "pixart":
        from transformers import T5Config, T5EncoderModel

        tok = _t5_tokenizer()
        enc = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                      relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
        net = d.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                         num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16,
                                         caption_channels=16, norm_type="ada_norm_single",
                                         use_additional_conditions=False)
        sched = d.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001,
                                             beta_end=0.02)
        return d.PixArtAlphaPipeline(tokenizer=tok, text_encoder=enc, vae=_kl_vae(), transformer=net,
                                     scheduler=sched)
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = _clip_tokenizer()
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok.get_vocab()), hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                                       bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = d.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                  layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                  norm_num_groups=8, attention_head_dim=4)
    sched = d.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                            set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
    return d.StableDiffusionPipeline(vae=_kl_vae(), text_encoder=enc, tokenizer=tok, unet=unet, scheduler=sched,
                                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save(kind: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build :func:`build` ``(kind, seed)`` and write it with ``save_pretrained`` to ``out_dir``."""
    out = Path(out_dir)
    pipe = build(kind, seed)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def write_prompts(path: str | Path) -> Path:
    """A prompt file (one prompt per line) for the text-conditioned kinds."""
    p = Path(path)
    p.write_text("".join(f"{line}\n" for line in PROMPTS))
    return p


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pipeline.tiny_pipelines OUT_DIR", file=sys.stderr)
        return 2
    root = Path(args[0])
    for kind in KINDS:
        print(save(kind, root / kind))
    print(write_prompts(root / "prompts.txt"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
