"""Parity of the model's parts with independent implementations.

- The LLaMA decoder + LM head against `transformers.LlamaForCausalLM` with the same random
  weights (text-only logits, fp32).
- The vision encoder against a straightforward EVA-CLIP written here from EMU2_FACTS.md alone
  (post-norm blocks, fused bias-free qkv + q_bias/v_bias, absolute position embedding, CLS
  dropped), with explicit softmax attention.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from emu2_engine.models import Emu2Config, Emu2Model
from emu2_engine.models.config import LlamaConfig, VisionConfig
from emu2_engine.models.llama import LlamaDecoder
from emu2_engine.models.vit import EVAVisionTransformer


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llama_matches_transformers(kv_heads):
    transformers = pytest.importorskip("transformers")
    cfg = LlamaConfig(vocab_size=301, hidden=96, layers=3, heads=4, kv_heads=kv_heads,
                      ffn_hidden=200, rms_eps=1e-6, rope_theta=10000.0, max_positions=128)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads, rms_norm_eps=cfg.rms_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_positions, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            scale = 0.2 if "norm" in name else 0.05
            base = 1.0 if "norm" in name else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=g))

    ours = LlamaDecoder(cfg).eval()
    head = torch.nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items() if k.startswith("model.")}
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    head.weight.data.copy_(hf.lm_head.weight.data)

    ids = torch.randint(0, cfg.vocab_size, (2, 57), generator=g)
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        B, S = ids.shape
        pos = torch.arange(S, dtype=torch.int32).expand(B, S)
        doc = torch.zeros(B, S, dtype=torch.int32)
        got = head(ours(ours.embed_tokens(ids), pos, doc, torch.full_like(doc, -1)))
    err = (got - want).abs().max().item()
    assert err < 1e-4, f"max abs logit error {err}"


def test_packed_documents_match_separate_rows():
    """Two documents packed in one row (positions restarting, doc mask) give the logits each
    document gets alone: RoPE restarts and nothing leaks between documents."""
    cfg = LlamaConfig(vocab_size=97, hidden=64, layers=2, heads=4, kv_heads=2, ffn_hidden=96)
    model = LlamaDecoder(cfg).eval()
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, 97, (1, 13), generator=g)
    b = torch.randint(0, 97, (1, 22), generator=g)

    def run(ids, pos, doc):
        with torch.no_grad():
            return model(model.embed_tokens(ids), pos, doc, torch.full_like(doc, -1))

    def alone(ids):
        S = ids.shape[1]
        return run(ids, torch.arange(S, dtype=torch.int32)[None], torch.zeros(1, S, dtype=torch.int32))

    packed = torch.cat([a, b, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    pos = torch.cat([torch.arange(13), torch.arange(22), torch.zeros(5, dtype=torch.long)]).int()[None]
    doc = torch.tensor([0] * 13 + [1] * 22 + [-1] * 5, dtype=torch.int32)[None]
    out = run(packed, pos, doc)
    torch.testing.assert_close(out[:, :13], alone(a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 13:35], alone(b), atol=1e-5, rtol=1e-5)


# --- the vision encoder, written again from the facts -------------------------------------

def _eva_by_hand(sd: dict, cfg: VisionConfig, pixels: torch.Tensor) -> torch.Tensor:
    p, C, Hh = cfg.patch_size, cfg.width, cfg.heads
    N = pixels.shape[0]
    g = cfg.image_size // p
    # Patch embedding as an explicit matmul over flattened patches (channel, row, col order).
    patches = pixels.reshape(N, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(N, g * g, 3 * p * p)
    w = sd["patch_embed.proj.weight"].reshape(C, 3 * p * p)
    x = patches @ w.T + sd["patch_embed.proj.bias"]
    x = torch.cat([sd["cls_token"].expand(N, 1, C), x], dim=1) + sd["pos_embed"]
    for i in range(cfg.depth):
        pre = f"blocks.{i}."
        qkv = x @ sd[pre + "attn.qkv.weight"].T
        q, k, v = qkv.split(C, dim=-1)
        q = q + sd[pre + "attn.q_bias"]
        v = v + sd[pre + "attn.v_bias"]
        heads = lambda t: t.reshape(N, -1, Hh, C // Hh).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // Hh), dim=-1)
        a = (att @ v).transpose(1, 2).reshape(N, -1, C)
        a = a @ sd[pre + "attn.proj.weight"].T + sd[pre + "attn.proj.bias"]
        x = x + F.layer_norm(a, (C,), sd[pre + "norm1.weight"], sd[pre + "norm1.bias"], cfg.ln_eps)
        m = F.gelu(x @ sd[pre + "mlp.fc1.weight"].T + sd[pre + "mlp.fc1.bias"])
        m = m @ sd[pre + "mlp.fc2.weight"].T + sd[pre + "mlp.fc2.bias"]
        x = x + F.layer_norm(m, (C,), sd[pre + "norm2.weight"], sd[pre + "norm2.bias"], cfg.ln_eps)
    return x[:, 1:]


def test_vit_matches_handwritten_eva():
    cfg = VisionConfig(image_size=42, patch_size=14, width=80, depth=3, heads=5, mlp_hidden=150)
    vit = EVAVisionTransformer(cfg).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    pixels = torch.randn(3, 3, 42, 42, generator=g)
    sd = {k: v.double() for k, v in vit.state_dict().items()}
    want = _eva_by_hand(sd, cfg, pixels.double())
    with torch.no_grad():
        got = vit(pixels)
    assert got.shape == (3, 9, 80)
    err = (got.double() - want).abs().max().item()
    assert err < 1e-4, f"max abs feature error {err}"


def test_vit_param_names_match_released_layout():
    vit = EVAVisionTransformer(VisionConfig(image_size=28, patch_size=14, width=32, depth=2,
                                            heads=2, mlp_hidden=64))
    names = set(vit.state_dict())
    for n in ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
              "blocks.1.norm1.weight", "blocks.1.norm2.bias", "blocks.0.attn.qkv.weight",
              "blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "blocks.0.attn.proj.weight",
              "blocks.0.attn.proj.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias"]:
        assert n in names, n
    assert "blocks.0.attn.qkv.bias" not in names and "blocks.0.attn.k_bias" not in names


def test_emu2_37b_size_on_meta():
    cfg = Emu2Config.from_preset("emu2-37b")
    with torch.device("meta"):
        model = Emu2Model(cfg)
    total = sum(p.numel() for p in model.parameters())
    vit = sum(p.numel() for p in model.visual.parameters())
    assert 36.5e9 <= total <= 37.5e9, total
    assert 4.3e9 <= vit <= 4.4e9, vit  # EMU2_FACTS: about 4.35B in the ViT
    assert model.visual.blocks["0"].mlp.fc1.out_features == 15360
    attn = model.visual.blocks["0"].attn  # 16 heads of 112 (EMU2_FACTS)
    assert attn.head_dim == 112 and attn.qkv.out_features == 3 * 16 * 112


def test_chat_preset_and_unknown_preset():
    chat = Emu2Config.from_preset("emu2-chat-37b")
    assert chat.llm.vocab_size == 32274 and chat.n_query == 256
    with pytest.raises(ValueError, match="unknown model preset 'emu2-38b'.*expected one of"):
        Emu2Config.from_preset("emu2-38b")
