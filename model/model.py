"""DeepSeek-VL2: vision tower + projector + DeepSeekMoE decoder, with batched generation."""
from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .config import VL2Config
from .language import LanguageModel
from .sampling import draw, uniform
from .vision import Projector, VisionTower


class DeepseekVL2(nn.Module):
    def __init__(self, cfg: VL2Config):
        super().__init__()
        self.cfg = cfg
        n = cfg.projector_config.n_embed
        self.vision = VisionTower(cfg.vision_config)
        self.projector = Projector(cfg.projector_config)
        self.image_newline = nn.Parameter(torch.zeros(n))
        self.view_seperator = nn.Parameter(torch.zeros(n))  # sic: the checkpoint's spelling
        self.language = LanguageModel(cfg.language_config)
        self.vision_chunk = 64  # tiles per ViT call: bounds activation memory on big batches
        # set by model.expert_parallel.shard_experts: forward and generate become collective over its group
        self.expert_parallel = None

    @property
    def device(self) -> torch.device:
        return self.language.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language.lm_head.weight.dtype

    # -- embeddings ----------------------------------------------------------------------------

    def encode_tiles(self, tiles: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """[N,3,384,384] (or pieces of it, e.g. one per request, in order) -> [N, 196, n_embed]. Pieces are
        not joined first: a chunk of `vision_chunk` tiles inside one piece is a view of it, and only a chunk
        across pieces is copied (joining a 7-tile request's float32 tiles took ~5 ms on CPU)."""
        pieces = [tiles] if isinstance(tiles, torch.Tensor) else list(tiles)
        out = [self.projector(self.vision(t.to(self.dtype))) for t in _chunks(pieces, self.vision_chunk)]
        return out[0] if len(out) == 1 else torch.cat(out)

    def _image_rows(self, feats: torch.Tensor, w_tiles: int, h_tiles: int) -> torch.Tensor:
        """One image's tiles [1 + w*h, hw, D] -> its placeholder rows, in the reference layout:
        global grid with a newline per row, the view separator, then the local grid (tiles joined
        row-major) with a newline per row."""
        _, hw, d = feats.shape
        side = int(hw**0.5)
        nl = self.image_newline.to(feats.dtype)
        glob = torch.cat([feats[0].view(side, side, d), nl.expand(side, 1, d)], dim=1).reshape(-1, d)
        local = feats[1:].view(h_tiles, w_tiles, side, side, d).permute(0, 2, 1, 3, 4)
        local = local.reshape(h_tiles * side, w_tiles * side, d)
        local = torch.cat([local, nl.expand(h_tiles * side, 1, d)], dim=1).reshape(-1, d)
        return torch.cat([glob, self.view_seperator.to(feats.dtype)[None], local])

    def rows_by_sequence(self, feats: torch.Tensor, crops: Sequence[Sequence[tuple[int, int]]]
                         ) -> list[torch.Tensor | None]:
        """Each sequence's image placeholder rows [n, D] (None without an image) from `encode_tiles`' output
        over all sequences' tiles in order; `crops[b]` is sequence b's real (w, h) crops, one per image."""
        out, t = [], 0
        for crop in crops:
            rows = []
            for w, h in crop:
                rows.append(self._image_rows(feats[t : t + 1 + w * h], w, h))
                t += 1 + w * h
            out.append(torch.cat(rows) if rows else None)
        return out

    def embed(self, inputs: Any) -> torch.Tensor:
        ids = inputs.input_ids.to(self.device)
        embeds = self.language.model.embed_tokens(ids)
        crops = [list(_real(row)) for row in inputs.images_spatial_crop.tolist()]
        counts = [sum(1 + w * h for w, h in crop) for crop in crops]
        if sum(counts) == 0:
            return embeds
        feats = self.encode_tiles([inputs.images[b, :c].to(self.device) for b, c in enumerate(counts) if c])
        mask = inputs.images_seq_mask.to(self.device)
        for b, rows in enumerate(self.rows_by_sequence(feats, crops)):
            if rows is None:
                continue
            if int(mask[b].sum()) != rows.shape[0]:
                raise ValueError(f"sequence {b}: {int(mask[b].sum())} image placeholders but {rows.shape[0]} image rows")
            embeds[b, mask[b]] = rows.to(embeds.dtype)
        return embeds

    # -- forward / generate ----------------------------------------------------------------------

    def _step(self) -> None:
        """Under expert parallelism each decoder call is a step of the whole group: announce it."""
        if self.expert_parallel is not None:
            self.expert_parallel.step_together(True)

    def _serve_rest(self) -> None:
        """Under expert parallelism: serve this rank's experts until every rank is done."""
        if self.expert_parallel is not None:
            self.expert_parallel.finish()

    def _embed_or_serve(self, inputs: Any) -> torch.Tensor:
        """`embed`; under expert parallelism a bad input fails this rank only after it has served the
        others' steps, so one bad batch does not leave the group waiting for it."""
        try:
            return self.embed(inputs)
        except Exception:
            self._serve_rest()
            raise

    @torch.inference_mode()
    def forward(self, inputs: Any) -> torch.Tensor | None:
        """Full-prompt logits [B,T,vocab] (float32), no cache. None in, None out: an expert-parallel
        rank with nothing to run."""
        if inputs is None:
            return self._nothing_to_run()
        embeds = self._embed_or_serve(inputs)
        valid = inputs.attention_mask.to(self.device).bool()
        self.language.clear_cache()
        self._step()
        logits = self.language(embeds, _positions(valid), valid)
        self._serve_rest()
        return logits

    def _nothing_to_run(self) -> None:
        if self.expert_parallel is None:
            raise ValueError("inputs is None: only an expert-parallel rank may pass None (to serve its experts)")
        self.expert_parallel.finish()
        return None

    @torch.inference_mode()
    def generate(
        self,
        inputs: Any,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        prefill_chunk: int | None = None,
        eos_token_id: int | None = None,
        return_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """New token ids [B, N'] (N' <= max_new_tokens). Greedy when temperature == 0; rows that hit
        EOS keep emitting EOS (the pad) until every row is done, as HF generate does. With
        `return_logits`, also the raw logits of each step [B, N', vocab]. When sampling, row b draws as a
        request seeded `seed + b` does in the engine (`model.sampling.uniform`); no seed: a random one. None
        in, None out: an expert-parallel rank with nothing to run."""
        if inputs is None:
            return self._nothing_to_run()
        eos = self.cfg.language_config.eos_token_id if eos_token_id is None else eos_token_id
        ids = inputs.input_ids.to(self.device)
        valid_prompt = inputs.attention_mask.to(self.device).bool()
        b, t = ids.shape
        embeds = self._embed_or_serve(inputs)
        valid = torch.zeros(b, t + max_new_tokens, dtype=torch.bool, device=self.device)
        valid[:, :t] = valid_prompt
        positions = _positions(valid_prompt)
        if temperature > 0:
            first = seed if seed is not None else random.getrandbits(63)
            seeds = [first + r for r in range(b)]
        # pads stand in as the row's last prompt token (always real under left padding)
        seen = torch.where(valid_prompt, ids, ids[:, -1:]) if repetition_penalty != 1.0 else None

        self.language.setup_cache(b, t + max_new_tokens)
        try:
            chunk = prefill_chunk or t
            for s in range(0, t, chunk):
                e = min(s + chunk, t)
                self._step()
                logits = self.language(embeds[:, s:e], positions[:, s:e], valid[:, :e], start=s, last_only=True)
            out, raw = [], []
            done = torch.zeros(b, dtype=torch.bool, device=self.device)
            pos = positions[:, -1:]
            for step in range(max_new_tokens):
                if return_logits:
                    raw.append(logits[:, -1])
                u = torch.tensor([uniform(r, step) for r in seeds], dtype=torch.float64) if temperature > 0 else None
                nxt = _pick(logits[:, -1], seen, temperature, top_p, repetition_penalty, u)
                if eos is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                    done |= nxt == eos
                out.append(nxt)
                if seen is not None:
                    seen = torch.cat([seen, nxt[:, None]], dim=1)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                slot = t + step
                valid[:, slot] = True
                pos = pos + 1
                emb = self.language.model.embed_tokens(nxt[:, None])
                self._step()
                logits = self.language(emb, pos, valid[:, : slot + 1], start=slot)
        finally:
            self.language.clear_cache()
        self._serve_rest()
        tokens = torch.stack(out, dim=1) if out else torch.zeros(b, 0, dtype=torch.long, device=self.device)
        if return_logits:
            return tokens, torch.stack(raw, dim=1) if raw else logits[:, :0]
        return tokens


def _chunks(pieces: Sequence[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """The rows of `pieces`, in order, as consecutive chunks of `size` rows: a view where a chunk lies in
    one piece, a copy only where it spans several."""
    parts, have = [], 0  # the chunk being filled and its rows
    for piece in pieces:
        start = 0
        while start < len(piece):
            part = piece[start : start + size - have]
            parts.append(part)
            start, have = start + len(part), have + len(part)
            if have == size:
                yield parts[0] if len(parts) == 1 else torch.cat(parts)
                parts, have = [], 0
    if parts:
        yield parts[0] if len(parts) == 1 else torch.cat(parts)


def _real(row: list[list[int]]):
    """(w, h) crops of one sequence up to the first zero pad, like the reference's break."""
    for w, h in row:
        if w == 0 or h == 0:
            break
        yield w, h


def _positions(valid: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at each sequence's first real token (left padding)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def _pick(logits, seen, temperature, top_p, repetition_penalty, u) -> torch.Tensor:
    """HF's order: repetition penalty, temperature, top-p, then sample (or argmax)."""
    logits = logits.float()
    if seen is not None:
        got = logits.gather(1, seen)
        logits = logits.scatter(1, seen, torch.where(got < 0, got * repetition_penalty, got / repetition_penalty))
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return draw(probs, u.to(probs.device))
