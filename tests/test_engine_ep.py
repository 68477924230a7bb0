"""The continuous-batching engine on every rank of an expert-parallel group (2 and 4 gloo ranks).

Each rank runs its own Engine on its own requests (the last rank has none; rank 0 has more than its
`max_seqs`, so its engine queues and refills while the others decode); the steps are collective. Every
rank's tokens must equal the single-process `model.generate` on each request alone (float32), both when
all ranks call `generate()` and when their background loops run, submissions arrive late and the ranks
close one after the other.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from model import Engine, SamplingParams, load_pretrained
from model.expert_parallel import join_group, leave_group
from tests.conftest import FIXTURES
from tests.test_engine import oracle
from tests.test_expert_parallel import RANK_TIMEOUT_S, _conv, _image, run_group

CHECKPOINTS = [FIXTURES / "tiny_mha-seed1", FIXTURES / "small_mla-seed1"]
ENGINE = dict(kv_cache_tokens=2048, max_seqs=2, max_step_tokens=64, block_size=16)


def requests(processor, world: int) -> list[list[tuple[object, SamplingParams]]]:
    """Per rank, its own (prepared input, params); uneven counts and lengths, the last rank with none."""
    img = processor.prepare(_conv("Describe the image.", True), [_image()])
    out = []
    for r in range(world):
        if r == world - 1:
            out.append([])
            continue
        texts = [processor.prepare(_conv("Where is the giraffe? " * (r + k + 1))) for k in range(3 if r == 0 else 1)]
        own = [(p, SamplingParams(max_new_tokens=4 + 3 * k + r)) for k, p in enumerate(texts)]
        if r == 0:
            own.append((img, SamplingParams(max_new_tokens=6, repetition_penalty=1.3)))
        else:
            own.append((texts[0], SamplingParams(max_new_tokens=5, temperature=0.8, top_p=0.9, seed=11 + r)))
        out.append(own)
    return out


def _rank(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    join_group(rank, world, port, RANK_TIMEOUT_S)
    plan = torch.load(Path(out) / "plan.pt", weights_only=False)
    results = {}
    for ckpt in CHECKPOINTS:
        mine = plan[ckpt.name][rank]
        model, processor = load_pretrained(ckpt, expert_parallel=True)
        traffic = model.expert_parallel.record()
        engine = Engine(model, processor, **ENGINE)
        together = engine.generate([p for p, _ in mine], [sp for _, sp in mine])
        idle_steps = engine.stats["idle_steps"]
        engine.close()

        looped = Engine(model, processor, **ENGINE).start()  # background loops; half the requests come late
        futs = [looped.submit(p, sp) for p, sp in mine[: len(mine) // 2]]
        time.sleep(0.2 * rank)
        futs += [looped.submit(p, sp) for p, sp in mine[len(mine) // 2 :]]
        loop_results = [f.result(timeout=RANK_TIMEOUT_S) for f in futs]
        time.sleep(0.1 * (world - rank))  # the ranks close at different times
        looped.close()
        results[ckpt.name] = {
            "generate": [(r.finish_reason, r.tokens) for r in together],
            "loop": [(r.finish_reason, r.tokens) for r in loop_results],
            "idle_steps": idle_steps,
            "received": sum(sum(x.received) for x in traffic.exchanges),
        }
    torch.save(results, Path(out) / f"rank{rank}.pt")
    leave_group()


@pytest.fixture(scope="module")
def references(fixtures_dir):
    return {ckpt.name: load_pretrained(ckpt) for ckpt in CHECKPOINTS}


@pytest.mark.parametrize("world", [2, 4])
def test_engine_on_every_rank_equals_generate_alone(world, references, tmp_path):
    plan = {name: requests(processor, world) for name, (_, processor) in references.items()}
    ranks = run_group(world, plan, tmp_path, _rank)
    for name, (model, processor) in references.items():
        for r in range(world):
            got = ranks[r][name]
            want = [oracle(model, processor, p, sp) for p, sp in plan[name][r]]
            assert [t for _, t in got["generate"]] == want, (name, r, "generate()")
            assert [t for _, t in got["loop"]] == want, (name, r, "background loop")
            assert all(reason in ("eos", "length") for reason, _ in got["generate"] + got["loop"]), (name, r)
        idle = ranks[world - 1][name]
        assert idle["generate"] == [] and idle["idle_steps"] > 0, (name, "the rank without requests served steps")
        assert idle["received"] > 0, (name, "its experts were used by the others")
