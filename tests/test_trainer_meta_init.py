"""Meta-device initialisation of pipeline stages: each stage draws from its own stream."""

from dataclasses import replace

import torch

from emu2_engine.models import Emu2Config, Emu2Model
from emu2_engine.parallel.pipeline import cut_stage
from emu2_engine.train.trainer import init_stage_weights


def test_stages_after_the_first_do_not_start_identical():
    debug = Emu2Config.from_preset("debug")
    cfg = replace(debug, llm=replace(debug.llm, layers=4))
    with torch.device("meta"):
        model = Emu2Model(cfg)
    stages = [cut_stage(model, range(i, i + 1), 4, i) for i in range(4)]
    init_stage_weights(stages, seed=0, device=torch.device("cpu"))
    blocks = [stage.llm.layers[str(i)] for i, stage in enumerate(stages)]
    for name, _ in blocks[1].named_parameters():
        if "norm" in name:  # norms start at ones everywhere
            continue
        w1, w2, w3 = (dict(b.named_parameters())[name] for b in blocks[1:])
        assert not torch.equal(w1, w2) and not torch.equal(w2, w3), name
    # the same seed gives the same stages again
    again = [cut_stage(model, range(i, i + 1), 4, i) for i in range(4)]
    init_stage_weights(again, seed=0, device=torch.device("cpu"))
    for a, b in zip(stages, again):
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(p, q), n
