"""CPU decode-only steps as one compiled function: what the CUDA graphs do for a GPU step.

At the test and benchmark shapes (the mini checkpoint: hidden 64, 3 layers) a 16-sequence decode step is about
1,700 small aten calls. Their dispatch, not their arithmetic, is most of the step (docs/performance.md,
twelfth session). `torch.compile` (inductor's C++) fuses them.

What it covers: decode-only steps of MHA layers. Attention is a reduction over each sequence's keys, read
through its block table to its own length.

The routed experts run as one padded batched product. Every expert is padded to the step's token count, so
shapes are static and there is no graph break. That is E/K times the routed work, so `unsupported` allows it
only where the experts are few for each one chosen.

Any other step, and any step after a failure to compile, runs `runner.forward_step`, which stays the oracle.
"""
from __future__ import annotations

import logging

import torch

from .language import MoE, _silu_gated

log = logging.getLogger(__name__)

MAX_EXPERTS_PER_CHOICE = 4  # padding every expert to the step's tokens costs E / K times the routed rows


def unsupported(language) -> str | None:
    """Why the compiled step cannot run this decoder, or None if it can."""
    cfg = language.cfg
    if cfg.use_mla:
        return "MLA attention (small, base) is not covered"
    if cfg.n_routed_experts and cfg.n_routed_experts > MAX_EXPERTS_PER_CHOICE * cfg.num_experts_per_tok:
        return (f"{cfg.n_routed_experts} experts for {cfg.num_experts_per_tok} chosen: padding each expert to the "
                f"step's tokens would waste more than {MAX_EXPERTS_PER_CHOICE}x the routed work")
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    return None


def _padded_experts(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor) -> torch.Tensor:
    """`Experts.forward` with static shapes: each expert's tokens in its own row block of [E, N, hidden] (no
    expert gets a token twice, so N rows always suffice), two batched products, then the same weighted sum."""
    n, k = idx.shape
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    chosen = flat[order]
    counts = torch.zeros(gate_up.shape[0], dtype=flat.dtype, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat))  # not bincount: its output shape depends on the data (a graph break)
    rank = torch.arange(flat.numel(), device=x.device) - (counts.cumsum(0) - counts)[chosen]
    rows = x.new_zeros(gate_up.shape[0], n, x.shape[1])
    rows[chosen, rank] = x[order // k]
    out = torch.bmm(_silu_gated(torch.bmm(rows, gate_up.transpose(1, 2))), down.transpose(1, 2))
    y = torch.empty(flat.numel(), x.shape[1], dtype=out.dtype, device=x.device)
    y[order] = out[chosen, rank]
    return (y.view(n, k, -1).float() * weight[..., None]).sum(1).to(x.dtype)


class CompiledDecode:
    @classmethod
    def for_model(cls, language) -> "CompiledDecode":
        """One per decoder, kept on it: every engine over the same model then shares one compiled graph (each
        new instance would be traced and compiled again), and one that failed is not tried again."""
        got = language.__dict__.get("_compiled_decode")
        if got is None:
            got = language.__dict__["_compiled_decode"] = cls(language)
        return got

    def __init__(self, language):
        self.language = language
        self.fallback: str | None = None
        # no guards on the modules' attributes: each call then checks only its tensors and ints (0.17 -> 0.06 ms
        # a step). Safe here: the engine never changes the model's modules, and a new model gets its own instance
        self._fn = torch.compile(self._step, dynamic=True,
                                 options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
                 lengths: torch.Tensor, block_size: int, cache) -> torch.Tensor | None:
        """One decode-only step: token embeddings [N, hidden] (N >= 2: a size of 1 would be compiled as its own
        graph) at `positions` [N], written to flat `slots` [N]; each row's block table [N, nb] and cached
        length [N], this token's included. Returns float32 logits [N, vocab], or None if it failed to compile
        or run (the caller then runs `forward_step`, and every later step too). Rerunning is safe: a failed
        step has at most rewritten some cache slots with the values the eager step writes again."""
        rope = self.language.model.layers[0].self_attn.rotary(positions[None], embeds.dtype)  # as forward_step
        try:
            return self._fn(embeds, rope, slots, tables, lengths, block_size, cache)
        except Exception as e:  # noqa: BLE001 - an optimisation: the eager step gives the same tokens
            self.fallback = f"{type(e).__name__}: {e}"[:500]
            log.warning("compiled CPU decode off, decode steps run eagerly: %s", self.fallback)
            return None

    def _step(self, x, rope, slots, tables, lengths, block_size: int, cache):
        n, nb = tables.shape
        # [1, N, 1, L]: which of each row's table positions hold its tokens (this one included)
        real = (torch.arange(nb * block_size, device=x.device)[None] < lengths[:, None])[None, :, None]
        for i, layer in enumerate(self.language.model.layers):
            attn = layer.self_attn
            h, kv, d = attn.heads, attn.kv_heads, attn.head_dim
            q, entries = attn.project_packed(layer.input_layernorm(x), rope)  # q [1, H, N, D]
            cache.write(i, slots, entries)
            # each row's blocks through its table, [kv, N, 1, nb, bs, D]: inductor loads them in place, one table
            # lookup per block and contiguous rows within it, never a gathered copy (a lookup per key, with its
            # division and remainder, made this kernel 1.7x slower: 0.78 against 0.45 ms at 16 catalog rows)
            k, v = (c.view(kv, -1, block_size, d)[:, tables][:, :, None] for c in cache.layers[i])
            qg = q[0].view(kv, h // kv, n, d).transpose(1, 2)[:, :, :, None, None]  # [kv, N, g, 1, 1, D]
            scores = (qg * k).sum(-1).flatten(-2) * d**-0.5  # [kv, N, g, L]
            p = scores.masked_fill(~real, float("-inf")).softmax(-1).unflatten(-1, (nb, block_size))
            out = (p[..., None] * v).sum((-3, -2)).transpose(0, 1).reshape(n, h * d)  # heads in kv-major order
            x = x + attn.o_proj(out)
            z = layer.post_attention_layernorm(x)
            mlp = layer.mlp
            if isinstance(mlp, MoE):
                idx, weight = mlp.gate(z)
                y = _padded_experts(z, idx, weight, mlp.experts.joined(), mlp.experts.down_proj)
                x = x + (y if mlp.shared_experts is None else y + mlp.shared_experts(z))
            else:
                x = x + mlp(z)
        lang = self.language
        return lang.lm_head(lang.model.norm(x)).float()
