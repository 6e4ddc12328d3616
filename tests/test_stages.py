"""Pipeline stages (tintc/eval/stages.py, backends/torch/stage_plan.py): a TinT split over 2 gloo
ranks in 2 CPU processes gives the single-process forward bit for bit, logits and decoded updates."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from backends.torch import stage_plan
from tintc.oracle.fidelity import example_input

from helpers import compile_tiny

FAMILIES = ("gpt2", "llama")
LENGTH = 16


def micro_batches(vocab: int) -> list:
    """Three micro-batches of different sizes, the first half of each sequence trained on."""
    return [example_input(vocab, LENGTH, batch, seed=seed) for seed, batch in ((1, 1), (2, 2), (3, 1))]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from tintc.eval.distributed import Group
    from tintc.eval.stages import Pipeline

    group = Group.from_environment("cpu")
    results = {}
    for family in FAMILIES:
        cfg, model, compiled = compile_tiny(family, "float32")
        tint = compiled.tint
        prefixes = tint.encode({n: p.detach() for n, p in model.named_parameters()})
        batches = [(ids, train, None) for ids, train, _ in micro_batches(compiled.graph.attrs["vocab"])]
        pipeline = Pipeline(tint, group, world, LENGTH)
        outputs, times = pipeline.run(batches, prefixes)
        results[family] = {"stage": (pipeline.stage.start, pipeline.stage.stop), "times": times}
        if outputs is not None:  # the last rank: the staged results, and the whole forward in one process
            with torch.no_grad():
                whole = [tint(ids, train, prefixes) for ids, train, _ in batches]
            results[family]["staged"] = [(logits, tint.decode(new)) for logits, new in outputs]
            results[family]["whole"] = [(logits, tint.decode(new)) for logits, new in whole]
            results[family]["calls"] = len(tint.program.calls)
            results[family]["cut"] = pipeline.plan[0].sends
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    group.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    out = tmp_path_factory.mktemp("stages")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("family", FAMILIES)
def test_two_stages_equal_one_process_bit_for_bit(two_stages, family):
    first, last = two_stages[0][family], two_stages[1][family]
    cut = last["cut"]
    assert first["stage"] == (0, cut.at) and last["stage"] == (cut.at, last["calls"])
    assert 0 < cut.at < last["calls"] and cut.tokens and cut.blocks  # both ranks work; streams cross
    assert len(last["staged"]) == len(last["whole"]) == 3
    for (logits, decoded), (want_logits, want_decoded) in zip(last["staged"], last["whole"]):
        assert torch.equal(logits, want_logits)
        assert decoded.keys() == want_decoded.keys()
        for name in decoded:
            assert torch.equal(decoded[name], want_decoded[name]), name


def test_plan_balances_cost_and_cuts_where_little_crosses():
    cfg, model, compiled = compile_tiny("gpt2", "float32")
    program = compiled.tint.program
    n = len(program.calls)
    assert [(s.start, s.stop) for s in stage_plan.plan(program, 1, LENGTH)] == [(0, n)]
    stages = stage_plan.plan(program, 3, LENGTH)
    assert [s.start for s in stages[1:]] == [s.stop for s in stages[:-1]] and stages[-1].stop == n
    total = sum(stage_plan.call_cost(program, i, LENGTH) for i in range(n))
    elements = stage_plan.crossing_elements(program, LENGTH)
    for k, s in enumerate(stages[:-1], 1):
        before = sum(stage_plan.call_cost(program, i, LENGTH) for i in range(s.stop))
        assert abs(before - k * total / 3) <= stage_plan.SLACK * total / 3 + max(
            stage_plan.call_cost(program, i, LENGTH) for i in range(n))
        assert s.sends.elements == elements[s.stop]
        near = [b for b in range(1, n) if abs(sum(stage_plan.call_cost(program, i, LENGTH) for i in range(b))
                                              - k * total / 3) <= stage_plan.SLACK * total / 3]
        assert not near or s.sends.elements == min(elements[b] for b in near)


def test_stages_must_match_the_processes():
    from ir.errors import ConfigError
    from tintc.eval.distributed import Group
    from tintc.eval.stages import check_stages

    with pytest.raises(ConfigError, match="--stages: got 2 with 1 process"):
        check_stages(2, Group.single())
