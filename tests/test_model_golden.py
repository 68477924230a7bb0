"""The model against the official reference's goldens (float32, CPU)."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from model import load_pretrained

FIXTURES = ["tiny_mha-seed1", "small_mla-seed1"]


def load_cases(path):
    z = np.load(path)
    cases = json.loads(str(z["meta_json"]))["cases"]
    out = {}
    for case in cases:
        n = int(z[f"{case}__num_images"])
        out[case] = {
            "conversation": json.loads(str(z[f"{case}__conversation_json"])),
            "images": [Image.open(io.BytesIO(z[f"{case}__image{j}_png"].tobytes())) for j in range(n)],
            **{k: z[f"{case}__{k}"] for k in ("input_ids", "inputs_embeds", "logits", "gen_tokens", "gen_logits")},
        }
    return out


@pytest.fixture(scope="module", params=FIXTURES)
def loaded(request, fixtures_dir):
    torch.manual_seed(0)
    model, processor = load_pretrained(fixtures_dir / request.param)
    return request.param, model, processor, load_cases(fixtures_dir / f"{request.param}.golden.npz")


def test_every_case_matches_reference(loaded):
    name, model, processor, cases = loaded
    assert len(cases) == 5
    for case, g in cases.items():
        inputs = processor(g["conversation"], g["images"])
        assert np.array_equal(inputs.input_ids.numpy(), g["input_ids"]), (name, case)
        embeds = model.embed(inputs)
        assert torch.allclose(embeds, torch.from_numpy(g["inputs_embeds"]), atol=1e-5, rtol=0), (name, case)
        logits = model(inputs)
        diff = (logits - torch.from_numpy(g["logits"])).abs().max().item()
        assert diff < 1e-4, (name, case, diff)
        tokens, step_logits = model.generate(inputs, max_new_tokens=8, return_logits=True)
        assert tokens[0].tolist() == g["gen_tokens"].tolist(), (name, case)
        gdiff = (step_logits[0] - torch.from_numpy(g["gen_logits"])).abs().max().item()
        assert gdiff < 1e-4, (name, case, gdiff)


def test_batch_equals_each_alone(loaded):
    """Left-padded batches of different lengths and image counts give each sequence's own logits
    at its real positions, and its own greedy tokens."""
    name, model, processor, cases = loaded
    picked = [cases[c] for c in ("text_only", "two_images_tiled", "grounding_ref", "three_images_untiled")]
    convs = [g["conversation"] for g in picked]
    imgs = [g["images"] for g in picked]
    batch = processor(convs, imgs)
    assert batch.input_ids.shape[0] == 4
    assert not bool(batch.attention_mask.all()), "the batch should need padding"
    logits = model(batch)
    tokens = model.generate(batch, max_new_tokens=6)
    for b, g in enumerate(picked):
        alone = processor(g["conversation"], g["images"])
        t = alone.input_ids.shape[1]
        want = model(alone)[0]
        got = logits[b, -t:]
        assert (got - want).abs().max().item() < 1e-4, (name, b)
        assert batch.attention_mask[b, -t:].all() and not batch.attention_mask[b, :-t].any()
        own = model.generate(alone, max_new_tokens=6)[0].tolist()
        assert tokens[b, : len(own)].tolist() == own, (name, b)


def test_prefill_in_chunks_matches_whole(loaded):
    name, model, processor, cases = loaded
    g = cases["single_1000x400_rgba"]
    inputs = processor(g["conversation"], g["images"])
    whole, lw = model.generate(inputs, max_new_tokens=4, return_logits=True)
    chunked, lc = model.generate(inputs, max_new_tokens=4, prefill_chunk=300, return_logits=True)
    assert whole.tolist() == chunked.tolist()
    assert (lw - lc).abs().max().item() < 1e-4
