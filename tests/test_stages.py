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


def _worker(rank: int, world: int, port: int, out: str, families: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from tintc.eval.distributed import Group
    from tintc.eval.stages import Pipeline

    group = Group.from_environment("cpu")
    results = {}
    for family in families:
        cfg, model, compiled = compile_tiny(family, "float32")
        tint = compiled.tint
        prefixes = tint.encode({n: p.detach() for n, p in model.named_parameters()})
        batches = [(ids, train, None) for ids, train, _ in micro_batches(compiled.graph.attrs["vocab"])]
        pipeline = Pipeline(tint, group, world, LENGTH)
        outputs, times = pipeline.run(batches, prefixes)
        results[family] = {"times": times, "plan": pipeline.plan}
        if outputs is not None:  # the last rank: the staged results, and the whole forward in one process
            with torch.no_grad():
                whole = [tint(ids, train, prefixes) for ids, train, _ in batches]
            results[family]["staged"] = [(logits, tint.decode(new)) for logits, new in outputs]
            results[family]["whole"] = [(logits, tint.decode(new)) for logits, new in whole]
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    group.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(out, world: int, families: tuple) -> list:
    mp.spawn(_worker, args=(world, free_port(), str(out), families), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory):
    return spawn(tmp_path_factory.mktemp("stages"), 2, FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_stages_equal_one_process_bit_for_bit(two_stages, family):
    first, last = two_stages[0][family], two_stages[1][family]
    plan = last["plan"]
    assert [s.stage for s in plan.segments] == [0, 1, 0, 1]  # up, down, up: the aux layers' order
    assert first["times"].calls == plan.calls_of(0) and last["times"].calls == plan.calls_of(1)
    assert {(m.sender, m.receiver) for m in plan.messages} == {(0, 1), (1, 0)}  # streams cross both ways
    assert "staged" not in first and len(last["staged"]) == len(last["whole"]) == 3
    for (logits, decoded), (want_logits, want_decoded) in zip(last["staged"], last["whole"]):
        assert torch.equal(logits, want_logits)
        assert decoded.keys() == want_decoded.keys()
        for name in decoded:
            assert torch.equal(decoded[name], want_decoded[name]), name


def test_three_stages_relay_and_equal_one_process(tmp_path):
    """Three stages: segments 0,1,2,1,0,1,2, and a stage receives two senders' messages (one sender's from
    two segments) before one segment."""
    ranks = spawn(tmp_path, 3, ("gpt2",))
    last = ranks[2]["gpt2"]
    assert [s.stage for s in last["plan"].segments] == [0, 1, 2, 1, 0, 1, 2]
    before_last = [(m.sender, m.sent) for m in last["plan"].messages if m.received == 6]
    assert len({sender for sender, _ in before_last}) == 2 and len(before_last) == 3  # stage 1 from two segments
    for (logits, decoded), (want_logits, want_decoded) in zip(last["staged"], last["whole"]):
        assert torch.equal(logits, want_logits)
        assert all(torch.equal(decoded[name], want_decoded[name]) for name in want_decoded)


def test_plan_follows_the_layers_and_balances_cost():
    cfg, model, compiled = compile_tiny("gpt2", "float32")
    program = compiled.tint.program
    n = len(program.calls)
    one = stage_plan.plan(program, 1, LENGTH)
    assert one.segments == (stage_plan.Segment(0, 0, n),) and one.messages == ()
    plan = stage_plan.plan(program, 3, LENGTH)
    assert [(s.start, s.stop) for s in plan.segments] == list(zip([0] + [s.stop for s in plan.segments[:-1]],
                                                                  [s.stop for s in plan.segments]))
    assert plan.segments[-1].stop == n and [s.stage for s in plan.segments] == [0, 1, 2, 1, 0, 1, 2]
    blocks = stage_plan.call_blocks(program)
    for block in set(blocks):  # every call of a block on the block's stage
        assert len({plan.owner[i] for i, b in enumerate(blocks) if b == block}) == 1
    costs = [stage_plan.call_cost(program, i, LENGTH) for i in range(n)]
    largest_block = max(sum(c for c, b in zip(costs, blocks) if b == block) for block in set(blocks))
    for cost in plan.costs:
        assert abs(cost - sum(costs) / 3) <= stage_plan.SLACK * sum(costs) / 3 + 2 * largest_block
    for m in plan.messages:
        assert m.sender != m.receiver and plan.segments[m.sent].stage == m.sender
        assert plan.segments[m.received].stage == m.receiver and m.received > m.sent


def test_stages_must_match_the_processes():
    from ir.errors import ConfigError
    from tintc.eval.distributed import Group
    from tintc.eval.stages import check_stages

    with pytest.raises(ConfigError, match="--stages: got 2 with 1 process"):
        check_stages(2, Group.single())
