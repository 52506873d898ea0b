"""Parallel layouts that cannot work are refused in one line; the pipeline split is balanced as
computed by hand; micro-batches become fixed-shape stage inputs. Pure Python, no processes."""

from dataclasses import replace

import pytest
import torch

from emu2_engine.data.batch import PackedBatch
from emu2_engine.models import Emu2Config
from emu2_engine.models.flops import head_flops, llm_flops, vit_flops_per_image
from emu2_engine.parallel import MicroBatchShape, ParallelConfig, ParallelDims
from emu2_engine.parallel.pipeline import (balance_layers, check_layers_per_stage,
                                           concat_microbatches, stage_costs, stage_ids_of_rank,
                                           stage_inputs)

DEBUG = Emu2Config.from_preset("debug")
EMU2 = Emu2Config.from_preset("emu2-37b")


def test_valid_layouts_pass():
    ParallelDims(dp_replicate=2, dp_shard=2, tp=2, pp=2).validate(16, DEBUG)
    ParallelDims(tp=4, dp_shard=8, pp=2).validate(64, EMU2)  # 52 heads, 17920 FFN: tp 4 divides
    ParallelDims().validate(1, EMU2)


@pytest.mark.parametrize("dims, world, message", [
    (ParallelDims(tp=2, pp=2), 8, r"dp_replicate x dp_shard x tp x pp = 1 x 1 x 2 x 2 = 4 must "
                                  r"equal the world size 8"),
    (ParallelDims(tp=0), 1, r"parallel.tp must be an integer >= 1, got 0"),
    (ParallelDims(pp=1.5), 1, r"parallel.pp must be an integer >= 1, got 1.5"),
    (ParallelDims(dp_replicate=2), 2, r"dp_replicate = 2 needs dp_shard > 1 \(HSDP\); for plain "
                                      r"data parallelism set dp_shard = 2 instead"),
])
def test_degrees_and_world_size(dims, world, message):
    with pytest.raises(ValueError, match=message):
        dims.validate(world)


def test_tp_must_divide_the_model():
    with pytest.raises(ValueError, match=r"parallel.tp = 8 must divide vision.heads \(4\) of the model 'debug'"):
        ParallelDims(tp=8).validate(8, DEBUG)
    # LLaMA-33B has 52 heads: tp = 8 is impossible, whatever the ViT allows.
    with pytest.raises(ValueError, match=r"parallel.tp = 8 must divide llm.heads \(52\)"):
        ParallelDims(tp=8).validate(8, EMU2)
    gqa = replace(DEBUG, vision=replace(DEBUG.vision, heads=8, width=128, mlp_hidden=512),
                  llm=replace(DEBUG.llm, heads=8, kv_heads=2))
    with pytest.raises(ValueError, match=r"tp = 4 must divide llm.kv_heads \(2\)"):
        ParallelDims(tp=4).validate(4, gqa)
    odd_ffn = replace(DEBUG, llm=replace(DEBUG.llm, ffn_hidden=385))
    with pytest.raises(ValueError, match=r"tp = 2 must divide llm.ffn_hidden \(385\)"):
        ParallelDims(tp=2).validate(2, odd_ffn)
    odd_mlp = replace(DEBUG, vision=replace(DEBUG.vision, mlp_hidden=255))
    with pytest.raises(ValueError, match=r"tp = 2 must divide vision.mlp_hidden \(255\)"):
        ParallelDims(tp=2).validate(2, odd_mlp)


def test_vocabulary_may_split_unevenly():
    # Emu2-Chat's 32274 rows over 4 ranks: 8069, 8069, 8068, 8068 (embedding and head loss take any blocks).
    ParallelDims(tp=4).validate(4, Emu2Config.from_preset("emu2-chat-37b"))


def test_fsdp_with_tp_must_divide_the_vit_width():
    with pytest.raises(ValueError, match=r"with tp > 1, parallel.dp_shard = 3 must divide "
                                         r"vision.width \(64\)"):
        ParallelDims(tp=2, dp_shard=3).validate(6, DEBUG)
    ParallelDims(dp_shard=3).validate(3, DEBUG)  # without TP FSDP shards dim 0, unevenly if need be


def test_mesh_needs_a_process_group():
    with pytest.raises(ValueError, match="build_mesh needs torch.distributed to be initialised"):
        ParallelDims().build_mesh("cpu")
    with pytest.raises(ValueError, match=r"no mesh yet: call build_mesh"):
        ParallelDims(tp=2).tp_mesh


@pytest.mark.parametrize("kw, dims, message", [
    (dict(activation_checkpoint="some"), ParallelDims(), r"activation_checkpoint must be one of "
                                                         r"\('none', 'selective', 'full'\), got 'some'"),
    (dict(param_dtype="fp8"), ParallelDims(), r"param_dtype must be one of"),
    (dict(pp_schedule="gpipe"), ParallelDims(pp=2), r"pp_schedule must be one of \['1f1b', "
                                                    r"'interleaved-1f1b', 'zbv', 'zero-bubble'\]"),
    (dict(microbatches=0), ParallelDims(), r"microbatches must be >= 1, got 0"),
    (dict(stages_per_rank=2), ParallelDims(), r"stages_per_rank = 2 needs pipeline parallelism"),
    (dict(stages_per_rank=2, microbatches=4), ParallelDims(pp=2),
     r"'1f1b' needs stages_per_rank exactly 1, got 2"),
    (dict(pp_schedule="zbv", stages_per_rank=3, microbatches=4), ParallelDims(pp=2),
     r"'zbv' needs stages_per_rank exactly 2, got 3"),
    (dict(pp_schedule="interleaved-1f1b", microbatches=4), ParallelDims(pp=2),
     r"'interleaved-1f1b' needs stages_per_rank at least 2, got 1"),
    # the split backward's second pass meets what selective checkpointing has released
    (dict(pp_schedule="zbv", stages_per_rank=2, microbatches=4, activation_checkpoint="selective"),
     ParallelDims(pp=2), r"'zbv' splits the backward in two passes, which selective activation"),
    (dict(pp_schedule="zero-bubble", stages_per_rank=2, microbatches=4, activation_checkpoint="selective"),
     ParallelDims(pp=2), r"'zero-bubble' splits the backward .* use activation_checkpoint = none or full"),
    (dict(microbatches=3), ParallelDims(pp=4), r"microbatches \(3\) must be at least pp \(4\) to "
                                               r"fill the pipeline"),
    (dict(pp_schedule="zbv", stages_per_rank=2, microbatches=3), ParallelDims(pp=4),
     r"microbatches \(3\) must be at least pp \(4\)"),
    (dict(pp_schedule="zero-bubble", stages_per_rank=2, microbatches=5), ParallelDims(pp=2),
     r"microbatches \(5\) must be a multiple of microbatches // pp = 2 for 'zero-bubble'"),
    (dict(pp_schedule="interleaved-1f1b", stages_per_rank=2, microbatches=4), ParallelDims(pp=2),
     r"4 pipeline stages \(pp x stages_per_rank\) need at least 3 LLM layers .* the model has 2"),
    (dict(microbatches=2, layers_per_stage=[1, 2]), ParallelDims(pp=2),
     r"layers_per_stage must sum to the LLM's 2 layers, got 3"),
])
def test_parallel_config_errors(kw, dims, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**kw).validate(dims, DEBUG)


def test_schedules_that_fit():
    ParallelConfig(pp_schedule="interleaved-1f1b", stages_per_rank=3, microbatches=6).validate(
        ParallelDims(pp=4), EMU2)  # 6 micro-batches in one round of 6
    ParallelConfig(pp_schedule="zbv", stages_per_rank=2, microbatches=8).validate(ParallelDims(pp=4), EMU2)


# -- pipeline split --------------------------------------------------------------------------
def test_balance_by_hand():
    assert balance_layers(4, 2, first=0, block=1, last=0) == [2, 2]
    # The heads make the last stage heavier: stage costs 4 and 2 + 2.
    assert balance_layers(6, 2, first=0, block=1, last=2) == [4, 2]
    # A ViT worth 10 blocks: stage 0 takes none, the others share evenly (not [0, 1, 5]).
    assert balance_layers(6, 3, first=10, block=1, last=0) == [0, 3, 3]
    # Uneven remainders go where they cost least: stage 0 pays 0.5 for its stem.
    assert balance_layers(7, 3, first=0.5, block=1, last=0) == [2, 3, 2] or \
        balance_layers(7, 3, first=0.5, block=1, last=0) == [2, 2, 3]
    assert balance_layers(3, 1, first=5, block=1, last=1) == [3]
    with pytest.raises(ValueError, match=r"5 pipeline stages need at least 4 LLM layers .* has 3"):
        balance_layers(3, 5, 1, 1, 1)


def test_stage_costs_count_the_vit():
    shape = MicroBatchShape(rows=1, seq_len=2048, images=8)
    first, block, last = stage_costs(EMU2, shape)
    one = replace(EMU2.llm, layers=1)
    assert block == sum(llm_flops(one, [2048]).values())
    assert first == 8 * vit_flops_per_image(EMU2.vision) + 8 * 2 * 64 * 1792 * 6656
    assert last == head_flops(EMU2, 2048, 0)
    # Eight 448-px images cost the ViT as much as 33 LLaMA-33B blocks cost a 2048-token row:
    # with the whole ViT on stage 0, stage 0 gets no block at pp = 4 and is still the longest.
    assert 33 < first / block < 34
    counts = balance_layers(60, 4, first, block, last)
    assert counts == [0, 20, 20, 20]


def test_manual_split_checks():
    check_layers_per_stage([0, 3, 3], 6, 3)
    with pytest.raises(ValueError, match=r"one entry per pipeline stage \(3\), got 2"):
        check_layers_per_stage([3, 3], 6, 3)
    with pytest.raises(ValueError, match=r"every later stage >= 1, got \[3, 3, 0\]"):
        check_layers_per_stage([3, 3, 0], 6, 3)


def test_stage_to_rank_maps():
    assert [stage_ids_of_rank(r, 4, 1, "loop") for r in range(4)] == [[0], [1], [2], [3]]
    assert [stage_ids_of_rank(r, 2, 3, "loop") for r in range(2)] == [[0, 2, 4], [1, 3, 5]]
    assert [stage_ids_of_rank(r, 4, 2, "v") for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]


# -- fixed-shape stage inputs ----------------------------------------------------------------
def _batch(n_images: int, reg_images: list[int], mask=None) -> PackedBatch:
    B, S, nq = 2, 8, 4
    slots = torch.arange(n_images * nq).view(n_images, nq)
    return PackedBatch(
        input_ids=torch.zeros(B, S, dtype=torch.long), labels=torch.full((B, S), -100),
        doc_ids=torch.zeros(B, S, dtype=torch.int32), span_ids=torch.full((B, S), -1, dtype=torch.int32),
        position_ids=torch.zeros(B, S, dtype=torch.int32), images=torch.zeros(n_images, 3, 4, 4),
        image_slots=slots, reg_images=torch.tensor(reg_images, dtype=torch.long),
        reg_positions=slots[reg_images] + 100, image_mask=mask)


def test_stage_inputs_make_regression_per_image():
    mb = stage_inputs(_batch(3, [2, 0]))
    assert mb["reg_mask"].tolist() == [True, False, True]
    assert mb["reg_positions"][0].tolist() == [100, 101, 102, 103]
    assert mb["reg_positions"][1].tolist() == [0, 0, 0, 0]
    assert mb["reg_positions"][2].tolist() == [108, 109, 110, 111]
    assert mb["image_mask"].tolist() == [True, True, True]  # None: every image is real
    padded = stage_inputs(_batch(3, [1], mask=torch.tensor([True, True, False])))
    assert padded["image_mask"].tolist() == [True, True, False]


def test_microbatches_concatenate_only_with_fixed_shapes():
    merged = concat_microbatches([stage_inputs(_batch(3, [0])), stage_inputs(_batch(3, []))])
    assert merged["input_ids"].shape == (4, 8) and merged["images"].shape == (6, 3, 4, 4)
    assert merged["reg_mask"].tolist() == [True, False, False, False, False, False]
    with pytest.raises(ValueError, match=r"micro-batch 1 has images of shape \(2, 3, 4, 4\), "
                                         r"micro-batch 0 \(3, 3, 4, 4\) .*data.max_images"):
        concat_microbatches([stage_inputs(_batch(3, [])), stage_inputs(_batch(2, []))])
