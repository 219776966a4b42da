"""Bit packing, exact save/load of quantized models, byte accounting, MACs and BitOPs."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from pipeline.quant.cost import bitops, count_macs, model_bytes
from pipeline.quant.bitstream import pack_bits, pack_mask, packed_size, unpack_bits, unpack_mask
from pipeline.quant.packing import load_quantized, packed_bytes, save_quantized, theoretical_bytes
from pipeline.quant.primitives import BinaryQuantizer, BinaryResidual, IntQuantizer
from pipeline.quant.surgery import (LayerQuant, QuantSpec, calibrate_activations, quant_layers, quantize_model)


# ---------------------------------------------------------------------------------------------
# bit streams
# ---------------------------------------------------------------------------------------------
def _reference_stream(codes, bits):
    """Independent reference: one big little-endian integer, code i at bit offset i*bits."""
    value = 0
    for i, c in enumerate(codes):
        value |= int(c) << (i * bits)
    nbytes = -(-len(codes) * bits // 8)
    return list(value.to_bytes(nbytes, "little"))


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_matches_reference_and_roundtrips(bits):
    gen = torch.Generator().manual_seed(bits)
    for n in (1, 7, 8, 13, 200):
        codes = torch.randint(0, 2 ** bits, (n,), generator=gen)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
        assert packed.tolist() == _reference_stream(codes.tolist(), bits)
        assert torch.equal(unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 100])
def test_bitstream_masks_and_sizes(n):
    gen = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=gen) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(n, 1) == math.ceil(n / 8)
    assert torch.equal(unpack_mask(packed, n), mask)
    for bits in (2, 3, 5, 8):
        assert packed_size(n, bits) == math.ceil(n * bits / 8) == pack_bits(torch.zeros(n, dtype=torch.long),
                                                                              bits).numel()


def test_pack_bits_3bit_density_and_errors():
    assert pack_bits(torch.arange(8), 3).numel() == 3  # 8 codes -> 3 bytes
    assert pack_bits(torch.arange(8), 3).tolist() == [0b10001000, 0b11000110, 0b11111010]
    with pytest.raises(ValueError, match="\\[0, 7\\]"):
        pack_bits(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="bits must be"):
        pack_bits(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="3 bytes"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 3, 8)


# ---------------------------------------------------------------------------------------------
# exact save / load
# ---------------------------------------------------------------------------------------------
class Toy(nn.Module):
    def __init__(self, hidden=64):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 16, 3, padding=1)
        self.fc1 = nn.Linear(256, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, 256)

    def forward(self, x, t):
        h = self.conv(x).flatten(1)
        h = torch.relu(self.norm(self.fc1(h)))
        return self.fc2(h)


TIMESTEPS = [999, 600, 200, 1]
_X = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(5))
_T = torch.tensor([999, 600, 200, 1])


def _mixed(layer, bits=(3, 4, 5), **kw):
    c = layer.num_out_channels
    gid = torch.arange(c) % len(bits)
    layer.set_weight_quantizers([IntQuantizer(b, channel_mask=gid == i, **kw) for i, b in enumerate(bits)])


def _mixed_binary(layer):
    """MPQ-DM's W2 groups: 3-bit, 2-bit and the 1-bit binary group, one third of the channels each."""
    gid = torch.arange(layer.num_out_channels) % 3
    layer.set_weight_quantizers([IntQuantizer(3, channel_mask=gid == 0), IntQuantizer(2, channel_mask=gid == 1),
                                 BinaryQuantizer(learnable=True, channel_mask=gid == 2)])


def _residual(layer):
    c = layer.num_out_channels
    mask = torch.zeros(c, dtype=torch.bool)
    mask[: c // 4] = True
    layer.set_weight_quantizers(list(layer.weight_quantizers), residual=BinaryResidual(c, mask))


def _in_scale(layer):
    gen = torch.Generator().manual_seed(2)
    layer.set_in_scale(torch.rand(layer.weight.shape[1], generator=gen) + 0.5)
    layer.calibrate_weight()


def _adaround(layer):
    ada = layer.use_adaround()
    with torch.no_grad():
        for a in ada:
            a.V.add_(torch.randn_like(a.V))  # move some roundings away from nearest
    layer.harden_adaround()


CASES = {
    "int_w2_channel": (dict(w_bits=2), None),
    "int_w3_channel": (dict(w_bits=3), None),
    "int_w4_channel_sym": (dict(w_bits=4, w_symmetric=True), None),
    "int_w8_channel_mse": (dict(w_bits=8, w_init="mse"), None),
    "int_w4_group32": (dict(w_bits=4, w_granularity="group", group_size=32), None),
    "int_w3_tensor": (dict(w_bits=3, w_granularity="tensor"), None),
    "mixed_345": (dict(w_bits=4), _mixed),
    "fp4_e2m1_group128": (dict(w_bits=4, w_format="fp", w_granularity="group", group_size=128), None),
    "fp6_channel": (dict(w_bits=6, w_format="fp"), None),
    "residual_w2": (dict(w_bits=2), _residual),
    "mixed_with_residual": (dict(w_bits=3), lambda layer: (_mixed(layer, (2, 3, 4)), _residual(layer))),
    "mixed_w2_binary": (dict(w_bits=2), _mixed_binary),
    "mixed_w2_binary_residual_act": (dict(w_bits=2, a_bits=4, a_mode="timestep"),
                                     lambda layer: (_in_scale(layer), _mixed_binary(layer), _residual(layer))),
    "in_scale_w4": (dict(w_bits=4), _in_scale),
    "adaround_int3": (dict(w_bits=3), _adaround),
    "adaround_fp4": (dict(w_bits=4, w_format="fp", w_granularity="group", group_size=128), _adaround),
    "static_act_a8": (dict(w_bits=4, a_bits=8), None),
    "fp_static_act_a6": (dict(w_bits=4, a_bits=6, a_format="fp"), None),
    "timestep_act_a6": (dict(w_bits=4, a_bits=6, a_mode="timestep"), None),
    "token_act_a8": (dict(w_bits=4, a_bits=8, a_mode="token"), _in_scale),
}


def _expected_bytes(model):
    """Σ rows · row_len · bits / 8 + 4 bytes per scale (and zero point for asymmetric int) / maxval,
    + residual (1 bit per weight, 4-byte α per channel) + in_scale — counted from the configuration."""
    total = 0.0
    for _, layer in quant_layers(model):
        c = layer.weight.shape[0]
        row = layer.weight[0].numel()
        for q in layer.weight_quantizers:
            rows = c if q.channel_mask is None else int(q.channel_mask.sum())
            total += rows * row * q.bits / 8
            if q.granularity == "tensor":
                entries = 1
            elif q.granularity == "channel":
                entries = rows
            else:
                entries = rows * math.ceil(row / q.group_size)
            asym_int = isinstance(q, IntQuantizer) and not q.symmetric
            binary = isinstance(q, BinaryQuantizer)  # 1 bit per weight + (μ, α) per channel
            total += entries * 4 * (2 if asym_int or binary else 1)
        if layer.residual is not None:
            rows = int(layer.residual.channel_mask.sum())
            total += rows * row / 8 + rows * 4
        if layer.in_scale is not None:
            total += layer.in_scale.numel() * 4
    return total


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_load_forward_bit_exact(case, tmp_path):
    cfg, modify = CASES[case]
    model = Toy()
    spec = QuantSpec(LayerQuant(**cfg))
    quantize_model(model, spec, timesteps=TIMESTEPS)
    if modify is not None:
        for _, layer in quant_layers(model):
            modify(layer)
    if cfg.get("a_bits"):
        calibrate_activations(model, lambda: model(_X, _T))
    with torch.no_grad():
        ref = model(_X, _T)
        fp_ref = Toy()(_X, _T)
    assert not torch.equal(ref, fp_ref)  # quantization is active
    summary = save_quantized(model, spec, tmp_path / "q", extra_meta={"case": case})
    loaded = load_quantized(Toy(), tmp_path / "q")
    with torch.no_grad():
        out = loaded(_X, _T)
    assert torch.equal(out, ref)
    # bytes: stored tensors of the quantized layers within 5 % of the configuration's count
    expected = _expected_bytes(model)
    stored = packed_bytes(tmp_path / "q")
    assert stored == summary["packed_bytes"]
    assert abs(stored - expected) <= 0.05 * expected, (stored, expected)
    assert theoretical_bytes(model) == pytest.approx(expected)
    # a loaded model can be saved again and reloads identically
    save_quantized(loaded, spec, tmp_path / "q2")
    again = load_quantized(Toy(), tmp_path / "q2")
    with torch.no_grad():
        assert torch.equal(again(_X, _T), ref)


def test_stored_bits_are_dense():
    """W3 per-channel of fc1 [64 x 256]: 64·256·3/8 = 6144 code bytes, nothing wider."""
    model = Toy()
    spec = QuantSpec(LayerQuant(w_bits=3), rules=[("conv", {"skip": True}), ("fc2", {"skip": True})])
    quantize_model(model, spec)
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        save_quantized(model, spec, d + "/q")
        tensors = load_file(d + "/q/packed.safetensors")
    assert tensors["q.fc1.w0.codes"].numel() == 64 * 256 * 3 // 8
    assert tensors["q.fc1.w0.scale"].shape == (64,)
    assert "fp.fc1.bias" in tensors and "fp.conv.weight" in tensors and "fp.fc1.weight" not in tensors


def test_unet_with_attention_roundtrip(tmp_path):
    from diffusers import UNet2DModel

    def build():
        torch.manual_seed(0)
        return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                           layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                           attention_head_dim=8).eval()

    model = build()
    spec = QuantSpec(LayerQuant(w_bits=4, a_bits=8, attn_bits=8, a_mode="timestep"))
    quantize_model(model, spec, timesteps=TIMESTEPS)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        calibrate_activations(model, lambda: model(x, _T))
        ref = model(x, _T).sample
    save_quantized(model, spec, tmp_path / "u")
    loaded = load_quantized(build(), tmp_path / "u")
    with torch.no_grad():
        assert torch.equal(loaded(x, _T).sample, ref)


def test_bad_save_and_load_inputs(tmp_path):
    model = Toy()
    spec = QuantSpec(LayerQuant(w_bits=4))
    quantize_model(model, spec)
    fc1 = dict(quant_layers(model))["fc1"]
    fc1.add_lora(2)
    with pytest.raises(ValueError, match="'fc1' has unmerged LoRA"):
        save_quantized(model, spec, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    fc1.merge_lora()
    fc1.use_adaround()
    with pytest.raises(ValueError, match="harden"):
        save_quantized(model, spec, tmp_path / "bad")
    fc1.harden_adaround()
    save_quantized(model, spec, tmp_path / "ok")

    with pytest.raises(FileNotFoundError, match="not found"):
        load_quantized(Toy(), tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="quant_spec.json"):
        load_quantized(Toy(), tmp_path / "empty")
    # a model of another width
    with pytest.raises(ValueError, match="'fc1'.*shape"):
        load_quantized(Toy(hidden=32), tmp_path / "ok")
    # corrupted / renamed / missing tensors, each on a fresh copy of the saved file
    from safetensors.torch import load_file, save_file

    packed = str(tmp_path / "ok" / "packed.safetensors")
    original = load_file(packed)

    def corrupt(edit):
        tensors = dict(original)
        edit(tensors)
        save_file(tensors, packed)

    corrupt(lambda t: t.update({"q.fc2.w0.codes": t["q.fc2.w0.codes"][:-3].clone()}))
    with pytest.raises(ValueError, match="layer 'fc2'.*codes"):
        load_quantized(Toy(), tmp_path / "ok")
    corrupt(lambda t: t.update({"q.fc2.w0.scales": t.pop("q.fc2.w0.scale")}))
    with pytest.raises(ValueError, match="layer 'fc2'.*scale.*missing"):
        load_quantized(Toy(), tmp_path / "ok")
    corrupt(lambda t: t.pop("fp.fc1.bias"))
    with pytest.raises(ValueError, match="'fc1.bias'"):
        load_quantized(Toy(), tmp_path / "ok")
    corrupt(lambda t: t.update({"fp.norm.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match="'norm.weight'.*shape"):
        load_quantized(Toy(), tmp_path / "ok")
    corrupt(lambda t: None)
    assert isinstance(load_quantized(Toy(), tmp_path / "ok"), Toy)
    (tmp_path / "ok" / "quant_spec.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_quantized(Toy(), tmp_path / "ok")


# ---------------------------------------------------------------------------------------------
# cost
# ---------------------------------------------------------------------------------------------
class CostNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)

    def forward(self, x, img):
        return self.fc(x), self.conv(img)


def test_macs_hand_computed_and_bitops_scale_with_bits():
    net = CostNet()
    x, img = torch.randn(2, 5, 16), torch.randn(2, 4, 8, 8)
    macs = count_macs(net, lambda: net(x, img))
    assert macs["fc"] == 2 * 5 * 8 * 16  # tokens · out · in
    assert macs["conv"] == (2 * 6 * 4 * 4) * (4 // 2) * 3 * 3  # out elems · C_in/groups · k²
    total = macs["fc"] + macs["conv"]
    assert bitops(net, macs, n_steps=1) == total * 32 * 32

    q8 = copy.deepcopy(net)
    quantize_model(q8, QuantSpec(LayerQuant(w_bits=8, a_bits=8)))
    calibrate_activations(q8, lambda: q8(x, img))
    assert count_macs(q8, lambda: q8(x, img)) == macs  # wrapping does not change MACs
    assert bitops(q8, macs, n_steps=1) == total * 64
    assert bitops(q8, macs, n_steps=10) == total * 64 * 10
    q4 = copy.deepcopy(net)
    quantize_model(q4, QuantSpec(LayerQuant(w_bits=4, a_bits=8)))
    assert bitops(q4, macs, 1) == total * 32
    # mixed masks: average bits
    _mixed(dict(quant_layers(q4))["fc"], bits=(3, 4, 5))  # 8 channels: 3 at 3 bits, 3 at 4, 2 at 5
    avg = (3 * 3 + 3 * 4 + 2 * 5) / 8
    assert bitops(q4, macs, 1) == pytest.approx(macs["fc"] * avg * 8 + macs["conv"] * 4 * 8)
    from pipeline.quant.surgery import quant_state

    quant_state(q4, weight=True, act=False)
    assert bitops(q4, macs, 1) == pytest.approx(macs["fc"] * avg * 32 + macs["conv"] * 4 * 32)
    with pytest.raises(ValueError, match="n_steps"):
        bitops(net, macs, 0)


def test_attention_matmuls_counted():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                norm_num_groups=8).eval()
    run = lambda m: m(torch.randn(1, 1, 8, 8), timestep=torch.tensor([5]), class_labels=torch.tensor([1]))
    macs = count_macs(dit, lambda: run(dit))
    tokens = (8 // 2) ** 2
    assert macs["transformer_blocks.0.attn1.qk"] == 1 * 2 * tokens * tokens * 8
    assert macs["transformer_blocks.0.attn1.pv"] == 1 * 2 * tokens * tokens * 8
    fp_ops = bitops(dit, macs, 1)
    q = copy.deepcopy(dit)
    quantize_model(q, QuantSpec(LayerQuant(w_bits=None, a_bits=None, attn_bits=8)))
    calibrate_activations(q, lambda: run(q))
    qmacs = count_macs(q, lambda: run(q))
    assert qmacs == macs  # the quantized processor records the same matmul MACs
    attn = 2 * tokens * tokens * 8 * 2
    assert fp_ops - bitops(q, qmacs, 1) == pytest.approx(attn * (32 * 32 - 8 * 8))


def test_model_bytes():
    net = Toy()
    n_params = sum(p.numel() for p in net.parameters())
    assert model_bytes(net) == 4 * n_params
    quantize_model(net, QuantSpec(LayerQuant(w_bits=4, w_symmetric=True)))
    weights = 16 * 36 + 64 * 256 + 256 * 64
    scales = 16 + 64 + 256
    expected = 4 * (n_params - weights) + weights * 4 / 8 + 4 * scales
    assert model_bytes(net) == round(expected)


def test_w2_binary_groups_count_one_bit_in_bits_bytes_and_bitops(tmp_path):
    model = Toy()
    spec = QuantSpec(LayerQuant(w_bits=2, a_bits=4))
    quantize_model(model, spec, timesteps=TIMESTEPS)
    for _, layer in quant_layers(model):
        _mixed_binary(layer)
    calibrate_activations(model, lambda: model(_X, _T))
    fc1 = model.fc1
    c, row = fc1.weight.shape
    n3, n2, n1 = [int(q.channel_mask.sum()) for q in fc1.weight_quantizers]
    assert fc1.w_bits == pytest.approx((3 * n3 + 2 * n2 + 1 * n1) / c)
    # bytes: codes at 3/2/1 bits + (scale, zero point) or (μ, α) per channel
    assert theoretical_bytes(model, ["fc1"]) == pytest.approx((3 * n3 + 2 * n2 + n1) * row / 8 + 8 * c)
    save_quantized(model, spec, tmp_path / "q")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "q" / "packed.safetensors"))
    assert tensors["q.fc1.w2.codes"].numel() == packed_size(n1 * row, 1)  # one stored bit per weight
    assert tensors["q.fc1.w2.mu"].shape == tensors["q.fc1.w2.alpha"].shape == (n1,)
    macs = count_macs(model, lambda: model(_X[:1], _T[:1]))
    assert bitops(model, {"fc1": macs["fc1"]}) == pytest.approx(macs["fc1"] * fc1.w_bits * 4)
