"""Import/export of the released Emu2 weights: round trips, every accepted variant, and errors
that name what is wrong and leave the model untouched."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from emu2_engine import convert
from emu2_engine.checkpoint import (
    CorruptCheckpointError,
    WeightsError,
    export_released_weights,
    load_released_weights,
    to_engine_name,
    to_released_name,
)
from emu2_engine.models import Emu2Config, Emu2Model

CFG = Emu2Config.from_preset("debug")


def _random_model(seed: int) -> Emu2Model:
    """A debug model whose every tensor (norms and biases included) is random."""
    torch.manual_seed(seed)
    model = Emu2Model(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)
    return model


@pytest.fixture(scope="module")
def source() -> Emu2Model:
    return _random_model(1)


@pytest.fixture
def target() -> Emu2Model:
    return _random_model(2)


def _released(model: Emu2Model) -> dict[str, torch.Tensor]:
    return {to_released_name(k): v.clone() for k, v in model.state_dict().items()}


def _snapshot(model: Emu2Model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _ids_and_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 23 tokens, each with one image ([IMG] <image> x 16 [/IMG]) among text."""
    s = CFG.special_ids
    row = [s.bos, 40, s.img] + [s.image] * CFG.n_query + [s.img_end, 17, 300, s.eos]
    ids = torch.tensor([row, row[:1] + [99] + row[2:]])
    return ids, torch.randn(2, 3, CFG.vision.image_size, CFG.vision.image_size)


def _assert_loaded(target: Emu2Model, source: Emu2Model, path) -> None:
    report = load_released_weights(target, path)
    assert sorted(report.loaded_keys) == sorted(source.state_dict())
    _assert_state_equal(target.state_dict(), source.state_dict())


# -- names ----------------------------------------------------------------------------------
def test_names_round_trip_and_variants():
    for name in Emu2Model(CFG).state_dict():
        assert to_engine_name(to_released_name(name)) == name
    assert to_released_name("llm.layers.1.mlp.up_proj.weight") == "decoder.lm.model.layers.1.mlp.up_proj.weight"
    assert to_released_name("projector.project_up.weight") == "decoder.lm.project_up.weight"
    assert to_engine_name("model.decoder.lm.lm_head.weight") == "lm_head.weight"
    assert to_engine_name("vl_adapter.projection.weight") == "projector.project_up.weight"
    assert to_engine_name("decoder.lm.stu_regress_head.weight") == "project_down.weight"
    assert to_engine_name("multimodal_encoder.visual.pos_embed") == "visual.pos_embed"
    assert to_engine_name("decoder.lm.model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert to_engine_name("unet.conv_in.weight") is None
    with pytest.raises(KeyError):
        to_engine_name("llm.norm.weight")  # an engine name is not a released one
    with pytest.raises(KeyError):
        to_released_name("decoder.lm.model.norm.weight")


# -- round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["file", "sharded"])
def test_export_load_round_trip(tmp_path, source, target, layout):
    path = tmp_path / ("emu2.safetensors" if layout == "file" else "emu2")
    export_released_weights(source, path, shard_size_bytes=None if layout == "file" else 200_000)
    if layout == "sharded":
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2
        assert set(index["weight_map"]) == set(_released(source))
    ids, images = _ids_and_images()
    before = target.logits(ids, images)
    _assert_loaded(target, source, path)
    after, want = target.logits(ids, images), source.logits(ids, images)
    assert not torch.equal(before, want)
    assert torch.equal(after, want)


def test_export_replaces_earlier_export_and_refuses_foreign_dirs(tmp_path, source):
    path = tmp_path / "out"
    export_released_weights(source, path, shard_size_bytes=100_000)
    n_shards = len(list(path.glob("*.safetensors")))
    export_released_weights(source, path, shard_size_bytes=10**9)
    assert len(list(path.glob("*.safetensors"))) == 1 < n_shards
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        export_released_weights(source, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("layout", ["file", "sharded"])
def test_failed_export_leaves_earlier_checkpoint_and_no_temporaries(tmp_path, source, monkeypatch, layout):
    from emu2_engine.checkpoint import released

    path = tmp_path / ("w.safetensors" if layout == "file" else "w")
    shard = None if layout == "file" else 200_000
    export_released_weights(source, path, shard)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    calls, real_save_file = [], released.save_file

    def failing_save_file(tensors, filename, metadata=None):
        """Writes the first shard, then fails mid-write of the next (or of the only file)."""
        calls.append(filename)
        real_save_file({k: tensors[k] for k in list(tensors)[:1]}, filename, metadata=metadata)
        if len(calls) == 2 or layout == "file":
            raise OSError("disk full")
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(released, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        export_released_weights(_random_model(6), path, shard)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    _assert_loaded(_random_model(7), source, path)


def test_load_casts_to_model_dtype(tmp_path, source):
    export_released_weights(source, tmp_path / "w.safetensors")
    half = _random_model(3).to(torch.bfloat16)
    load_released_weights(half, tmp_path / "w.safetensors")
    for k, v in source.state_dict().items():
        assert torch.equal(half.state_dict()[k], v.to(torch.bfloat16)), k


def test_a_model_built_on_meta_and_loaded_gives_the_same_logits(tmp_path, source):
    """The way to load 37B: build on the meta device, to_empty(), load the released weights.
    Nothing the checkpoint lacks may be left uninitialised (the rotary table was: NaN logits)."""
    export_released_weights(source, tmp_path / "w.safetensors")
    with torch.device("meta"):
        model = Emu2Model(CFG)
    model.to_empty(device="cpu")
    load_released_weights(model, tmp_path / "w.safetensors")
    ids = torch.tensor([[1, 17, 250, 9, 44, 3]])
    with torch.no_grad():
        assert torch.equal(model.logits(ids), source.logits(ids))


# -- variants -------------------------------------------------------------------------------
def _hf(sd):
    return {"model." + k: v for k, v in sd.items()}


def _old_names(sd):
    renames = {"decoder.lm.project_up.weight": "vl_adapter.projection.weight",
               "decoder.lm.project_down.weight": "decoder.lm.stu_regress_head.weight"}
    return {renames.get(k, k): v for k, v in sd.items()}


def _with_inv_freq(sd):
    extra = {f"decoder.lm.model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(16)
             for i in range(CFG.llm.layers)}
    return {**sd, **extra}


def _gen(sd):
    return {**{"multimodal_encoder." + k: v for k, v in sd.items()},
            "unet.conv_in.weight": torch.randn(8, 4, 3, 3), "vae.decoder.conv_out.bias": torch.randn(3),
            "safety_checker.vision_model.embeddings.class_embedding": torch.randn(16)}


@pytest.mark.parametrize("variant", [_hf, _old_names, _with_inv_freq, _gen])
def test_variants_load_safetensors(tmp_path, source, target, variant):
    save_file(variant(_released(source)), str(tmp_path / "w.safetensors"))
    _assert_loaded(target, source, tmp_path / "w.safetensors")


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
def test_torch_file_with_module_wrapper(tmp_path, source, target, suffix):
    torch.save({"module": _with_inv_freq(_released(source)), "global_steps": 7}, tmp_path / f"w{suffix}")
    report = load_released_weights(target, tmp_path / f"w{suffix}")
    assert "global_steps" in report.ignored_keys
    _assert_state_equal(target.state_dict(), source.state_dict())


def test_sharded_bin_with_index(tmp_path, source, target):
    sd = _gen(_released(source))
    names = list(sd)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    weight_map = {}
    for shard, keys in shards.items():
        torch.save({k: sd[k] for k in keys}, tmp_path / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _assert_loaded(target, source, tmp_path)


def test_dir_with_single_file(tmp_path, source, target):
    save_file(_hf(_released(source)), str(tmp_path / "model.safetensors"))
    _assert_loaded(target, source, tmp_path)


# -- errors (each leaves the model as it was) -----------------------------------------------
def _assert_fails_atomically(target, path, error, *fragments):
    before = _snapshot(target)
    with pytest.raises(error) as info:
        load_released_weights(target, path)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    _assert_state_equal(target.state_dict(), before)
    return info.value


def test_mismatch_lists_missing_unexpected_and_wrong_shapes(tmp_path, source, target):
    sd = _released(source)
    for i in range(CFG.llm.layers):
        del sd[f"decoder.lm.model.layers.{i}.mlp.up_proj.weight"]
    del sd["decoder.lm.model.norm.weight"]
    sd["decoder.lm.extra_head.weight"] = torch.randn(3, 4)
    sd["decoder.lm.lm_head.weight"] = torch.randn(10, CFG.llm.hidden)
    save_file(sd, str(tmp_path / "w.safetensors"))
    err = _assert_fails_atomically(
        target, tmp_path / "w.safetensors", WeightsError,
        "missing: 3", "decoder.lm.model.norm.weight (128,)", "decoder.lm.model.layers.0.mlp.up_proj.weight",
        "unexpected: 1", "decoder.lm.extra_head.weight (3, 4)",
        "wrong shape: 1", "decoder.lm.lm_head.weight: checkpoint (10, 128), model (784, 128)")
    assert sorted(err.missing) == ["llm.layers.0.mlp.up_proj.weight", "llm.layers.1.mlp.up_proj.weight",
                                   "llm.norm.weight"]
    assert err.unexpected == ["decoder.lm.extra_head.weight"]


def test_many_missing_keys_shows_first_five_and_count(tmp_path, source, target):
    sd = {k: v for k, v in _released(source).items() if not k.startswith("visual.blocks.")}
    n = len(source.state_dict()) - len(sd)  # 13 tensors per ViT block
    assert n == 13 * CFG.vision.depth
    save_file(sd, str(tmp_path / "w.safetensors"))
    err = _assert_fails_atomically(target, tmp_path / "w.safetensors", WeightsError,
                                   f"missing: {n}", f"and {n - 5} more")
    assert str(err).count("visual.blocks.") == 5


def test_non_strict_loads_the_rest_but_never_a_wrong_shape(tmp_path, source, target):
    sd = _released(source)
    del sd["decoder.lm.model.norm.weight"]
    sd["decoder.lm.extra_head.weight"] = torch.randn(3)
    save_file(sd, str(tmp_path / "w.safetensors"))
    norm_before = target.llm.norm.weight.clone()
    report = load_released_weights(target, tmp_path / "w.safetensors", strict=False)
    assert report.missing_keys == ["llm.norm.weight"]
    assert report.unexpected_keys == ["decoder.lm.extra_head.weight"]
    assert torch.equal(target.llm.norm.weight, norm_before)
    assert torch.equal(target.lm_head.weight, source.lm_head.weight)
    sd["decoder.lm.lm_head.weight"] = torch.randn(4, 4)
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsError, match="wrong shape: 1"):
        load_released_weights(target, tmp_path / "w.safetensors", strict=False)


def test_two_names_for_one_weight_is_an_error(tmp_path, source, target):
    sd = _released(source)
    sd["vl_adapter.projection.weight"] = sd["decoder.lm.project_up.weight"].clone()
    save_file(sd, str(tmp_path / "w.safetensors"))
    _assert_fails_atomically(target, tmp_path / "w.safetensors", WeightsError, "duplicate: 1", "already fills")


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_corrupt_file(tmp_path, target, suffix):
    path = tmp_path / f"w{suffix}"
    path.write_bytes(os.urandom(4096))
    _assert_fails_atomically(target, path, CorruptCheckpointError, str(path), "corrupt")


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_truncated_file(tmp_path, source, target, suffix):
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        export_released_weights(source, path)
    else:
        torch.save(_released(source), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _assert_fails_atomically(target, path, CorruptCheckpointError, str(path), "truncated")


def test_truncated_shard_fails_before_any_copy(tmp_path, source, target):
    export_released_weights(source, tmp_path / "ckpt", shard_size_bytes=200_000)
    last = sorted((tmp_path / "ckpt").glob("*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-100])
    _assert_fails_atomically(target, tmp_path / "ckpt", CorruptCheckpointError, last.name)


def test_missing_paths(tmp_path, source, target):
    _assert_fails_atomically(target, tmp_path / "nope.safetensors", FileNotFoundError, "nope.safetensors")
    (tmp_path / "empty").mkdir()
    _assert_fails_atomically(target, tmp_path / "empty", FileNotFoundError, "no checkpoint in directory")
    export_released_weights(source, tmp_path / "ckpt", shard_size_bytes=200_000)
    first = sorted((tmp_path / "ckpt").glob("*.safetensors"))[0]
    first.unlink()
    _assert_fails_atomically(target, tmp_path / "ckpt", FileNotFoundError, first.name)


def test_bad_index_and_unknown_suffix(tmp_path, target):
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    _assert_fails_atomically(target, tmp_path, CorruptCheckpointError, "index")
    (tmp_path / "w.npz").write_bytes(b"x")
    _assert_fails_atomically(target, tmp_path / "w.npz", ValueError, "unsupported")


# -- the CLI --------------------------------------------------------------------------------
def test_convert_cli_both_directions(tmp_path, source, capsys):
    export_released_weights(source, tmp_path / "released")
    assert convert.main(["--preset", "debug", "--from", str(tmp_path / "released"),
                         "--to", str(tmp_path / "engine.pt")]) == 0
    engine = torch.load(tmp_path / "engine.pt", weights_only=True)
    _assert_state_equal(engine, source.state_dict())

    assert convert.main(["--preset", "debug", "--export", "--from", str(tmp_path / "engine.pt"),
                         "--to", str(tmp_path / "back"), "--shard-size", "0.2MB"]) == 0
    assert len(list((tmp_path / "back").glob("*.safetensors"))) > 2
    model = _random_model(4)
    _assert_loaded(model, source, tmp_path / "back")
    ids, images = _ids_and_images()
    assert torch.equal(model.logits(ids, images), source.logits(ids, images))

    assert convert.main(["--preset", "debug", "--dtype", "bfloat16", "--from", str(tmp_path / "back"),
                         "--to", str(tmp_path / "engine.safetensors")]) == 0
    assert convert.main(["--preset", "debug", "--export", "--dtype", "bfloat16",
                         "--from", str(tmp_path / "engine.safetensors"),
                         "--to", str(tmp_path / "bf16.safetensors")]) == 0
    from safetensors import safe_open

    for written in (tmp_path / "engine.safetensors", tmp_path / "bf16.safetensors"):   # --dtype was obeyed
        with safe_open(written, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}, written
    half = _random_model(5).to(torch.bfloat16)
    load_released_weights(half, tmp_path / "bf16.safetensors")
    assert torch.equal(half.lm_head.weight, source.lm_head.weight.to(torch.bfloat16))


def test_convert_to_a_checkpoint_folder_that_a_run_starts_from(tmp_path, source, capsys):
    """Import into a folder name without a suffix: a checkpoint folder (DCP) holding the model
    alone, which `load_model_weights` (and so checkpoint.init_from) reads; an existing folder
    is refused, and no temporary folder is left."""
    from emu2_engine.checkpoint.dcp import load_model_weights

    export_released_weights(source, tmp_path / "released")
    assert convert.main(["--preset", "debug", "--from", str(tmp_path / "released"),
                         "--to", str(tmp_path / "folder")]) == 0
    model = _random_model(6)
    assert load_model_weights(tmp_path / "folder", model) == 0
    _assert_state_equal(model.state_dict(), source.state_dict())
    with pytest.raises(SystemExit):  # refused before any weight is read
        convert.main(["--preset", "debug", "--from", str(tmp_path / "nowhere"), "--to", str(tmp_path / "folder")])
    assert f"{tmp_path / 'folder'} exists: a checkpoint folder is written to a new name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "released"]


def test_convert_cli_errors(tmp_path, capsys):
    assert convert.main(["--preset", "debug", "--from", str(tmp_path / "nope"),
                         "--to", str(tmp_path / "e.pt")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    save_file({"decoder.lm.lm_head.weight": torch.zeros(2, 2)}, str(tmp_path / "w.safetensors"))
    assert convert.main(["--preset", "debug", "--from", str(tmp_path / "w.safetensors"),
                         "--to", str(tmp_path / "e.pt")]) == 1
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "e.pt").exists()
    with pytest.raises(SystemExit):
        convert.main(["--preset", "debug", "--from", "a", "--to", "engine.ckpt"])
    assert "must end in one of .pt, .pth, .safetensors (or be a folder name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert.main(["--help"])
    assert "--export" in capsys.readouterr().out


def test_export_copies_only_tensors_that_need_it():
    from emu2_engine.checkpoint.released import _plain_all

    own = torch.randn(4, 4)
    view_of_own = own.view(16)                 # shares storage with `own`
    slice_of_other = torch.randn(8)[2:6]       # does not fill its storage
    out = _plain_all({"own": own, "view": view_of_own, "slice": slice_of_other},
                     ["own", "view", "slice"])
    assert out["own"].data_ptr() == own.data_ptr()            # written in place, no copy
    assert out["view"].data_ptr() != own.data_ptr()           # copied: safetensors refuses sharing
    assert out["slice"].data_ptr() != slice_of_other.data_ptr()
    for name, t in out.items():
        assert torch.equal(t, {"own": own, "view": view_of_own, "slice": slice_of_other}[name])


def test_a_transformers_llama_in_the_released_layout_gives_its_own_logits(tmp_path, target):
    """A released-layout file whose LLM is transformers' own LlamaForCausalLM (random weights,
    Emu2's RMSNorm eps 1e-6 and RoPE theta 10000 from EMU2_FACTS.md, not the engine's defaults)
    under ``decoder.lm.``: loaded through the released names, the engine's logits are
    transformers'. The other tests build their released files with `to_released_name` itself, so
    a name table wrong both ways, or a changed default eps or theta, passed them."""
    transformers = pytest.importorskip("transformers")
    llm = CFG.llm
    hf_cfg = transformers.LlamaConfig(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden, intermediate_size=llm.ffn_hidden,
        num_hidden_layers=llm.layers, num_attention_heads=llm.heads, num_key_value_heads=llm.kv_heads,
        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=llm.max_positions,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.05 * torch.randn(p.shape, generator=g))
    tensors = {f"decoder.lm.{k}": v.contiguous() for k, v in hf.state_dict().items()}
    others = _random_model(6).state_dict()
    tensors.update({to_released_name(k): v for k, v in others.items()
                    if k.startswith(("visual.", "projector.", "project_down."))})
    save_file(tensors, tmp_path / "w.safetensors")
    load_released_weights(target, tmp_path / "w.safetensors")
    ids = torch.randint(0, 500, (2, 19), generator=g)
    with torch.no_grad():
        got, want = target.eval().logits(ids), hf(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4


def test_a_torch_file_from_the_official_model_is_told_from_engine_weights(tmp_path, source):
    """A torch file saved from the official Emu2 model starts with the ``visual.*`` names both
    layouts share; `holds_released_names` reads on to the first name that differs (it used to
    decide by the first name, so checkpoint.init_from refused such a file)."""
    from emu2_engine.checkpoint.released import holds_released_names

    released = _released(source)
    ordered = dict(sorted(released.items(), key=lambda kv: not kv[0].startswith("visual.")))
    assert next(iter(ordered)).startswith("visual.")
    torch.save(ordered, tmp_path / "pytorch_model.bin")
    torch.save({"module": ordered}, tmp_path / "wrapped.pt")
    engine = dict(sorted(source.state_dict().items(), key=lambda kv: not kv[0].startswith("visual.")))
    torch.save(engine, tmp_path / "engine.pt")
    assert holds_released_names(tmp_path / "pytorch_model.bin")
    assert holds_released_names(tmp_path / "wrapped.pt")
    assert not holds_released_names(tmp_path / "engine.pt")


def test_emu2_37b_preset_is_the_released_model():
    """The numbers of EMU2_FACTS.md's table, pinned (the parity tests pass eps and theta to both
    sides, so a changed default passed them), and every norm is built with its config's eps."""
    cfg = Emu2Config.from_preset("emu2-37b")
    v, llm = cfg.vision, cfg.llm
    assert (v.image_size, v.patch_size, v.width, v.depth, v.heads, v.mlp_hidden, v.ln_eps) == (
        448, 14, 1792, 64, 16, 15360, 1e-6)
    assert (llm.hidden, llm.layers, llm.heads, llm.kv_heads, llm.ffn_hidden, llm.rms_eps, llm.rope_theta,
            llm.max_positions, llm.vocab_size) == (6656, 60, 52, 52, 17920, 1e-6, 10000.0, 2048, 32272)
    assert cfg.n_query == 64 and llm.hidden // llm.heads == 128
    odd = Emu2Config(name="odd", vision=replace(CFG.vision, ln_eps=3e-6), llm=replace(CFG.llm, rms_eps=7e-6),
                     base_vocab_size=CFG.base_vocab_size, n_query=CFG.n_query)
    model = Emu2Model(odd)
    layer_norms = [m for m in model.visual.modules() if isinstance(m, torch.nn.LayerNorm)]
    rms_norms = [m for m in model.llm.modules() if type(m).__name__ == "RMSNorm"]
    assert layer_norms and all(m.eps == 3e-6 for m in layer_norms)
    assert rms_norms and all(getattr(m, "eps", None) == 7e-6 for m in rms_norms), [vars(m) for m in rms_norms[:1]]


def test_hf_layout_with_the_projections_at_the_top_level(tmp_path, source, target):
    """The Hugging Face remote-code layout: everything under ``model.``, except the two
    projections, which public copies of its modeling code hold beside ``model`` (``project_up.*``,
    ``project_down.*``): it loads."""
    tensors = {}
    for name, value in _released(source).items():
        top = name.removeprefix("decoder.lm.")
        tensors[top if top.startswith(("project_up.", "project_down.")) else "model." + name] = value
    assert "project_up.weight" in tensors and "model.visual.cls_token" in tensors
    save_file(tensors, tmp_path / "w.safetensors")
    _assert_loaded(target, source, tmp_path / "w.safetensors")
