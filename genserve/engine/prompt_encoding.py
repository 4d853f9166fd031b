"""Weighted, chunked prompt encoding as AUTOMATIC1111 does it, for SD1 and both SDXL text encoders.

A prompt of any length is tokenized (textual-inversion tokens expanded as diffusers does), cut into
chunks of 75 tokens (at a comma within the last 20 tokens when there is one, at every `BREAK`), each
chunk framed `<bos> 75 tokens <eos>` (padded with the tokenizer's pad token after the first `<eos>`),
encoded on its own, and the chunks concatenated along the sequence: a 200-token prompt conditions on
all 200 tokens. Per chunk, each token's hidden state is multiplied by its weight and the chunk is
rescaled so its mean is what it was ("Original" emphasis, `modules/sd_hijack_clip.py`). On SDXL this
happens for each encoder on its own; the pooled embedding is the second encoder's of the first chunk.

Clip skip, per family, as A1111, ComfyUI and Civitai mean it:
* SD1: N selects `hidden_states[-N]` followed by the final layer norm (N = 1: the last layer).
* SDXL: both encoders always use the penultimate layer without the final norm (A1111's and ComfyUI's
  SDXL default, what Civitai's forced `clipSkip: 2` means); 1 and 2 both give that. N >= 3 selects
  `hidden_states[-N]` (ComfyUI `CLIPSetLastLayer(-N)`, A1111's "clip skip for SDXL" option).

Safety tokens: `protected_prefix` text is encoded first, at weight 1, and after the emphasis its
positions are restored to their unweighted values. CLIP's attention is causal, so those states do not
depend on anything the user wrote after them: no weight, BREAK or edit can reweight or move them.

The positive and negative conditionings must have the same length for one batched UNet call: the
shorter is padded with encodings of the empty prompt (A1111's "pad prompt/negative prompt" option;
A1111's default runs them in two UNet calls instead, which is the same for prompts of equal length).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from genserve.engine.prompt_syntax import BREAK_MARK, parse_prompt_attention

CHUNK_LENGTH = 75
COMMA_BACKTRACK = 20
MIN_RESCALE, MAX_RESCALE = 0.1, 10.0  # bounds of the mean-restoring factor (see `_encode_chunks`)


@dataclass
class _Chunk:
    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    protected: list[bool] = field(default_factory=list)


@dataclass(frozen=True)
class Conditioning:
    """One prompt's encoding: `embeds` [1, 77 * chunks, dim]; `pooled` [1, dim2] on SDXL."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    @property
    def chunks(self) -> int:
        return self.embeds.shape[1] // (CHUNK_LENGTH + 2)


def a1111_layer(family_is_sdxl: bool, clip_skip: int) -> int | None:
    """The hidden-state index (negative, from the end) the conditioning is read from; None: the
    encoder's final output (SD1 with clip skip 1)."""
    if family_is_sdxl:
        return -max(2, clip_skip)
    return None if clip_skip <= 1 else -clip_skip


class PromptEncoder:
    """Encodes A1111-syntax prompts with a pipeline's tokenizers and text encoders (LoRA layers active
    in them apply, as they do inside the pipeline)."""

    def __init__(self, pipe: Any, clip_skip: int = 1):
        self.pipe = pipe
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.layer = a1111_layer(self.sdxl, clip_skip)
        self.slots: list[tuple[Any, Any]] = [(pipe.tokenizer, pipe.text_encoder)] if pipe.text_encoder is not None else []
        if self.sdxl:
            self.slots.append((pipe.tokenizer_2, pipe.text_encoder_2))
        self._empty: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    # -- tokens -------------------------------------------------------------------------------

    def _tokenize(self, tokenizer: Any, texts: list[str]) -> list[list[int]]:
        convert = getattr(self.pipe, "maybe_convert_prompt", None)
        if convert is not None:
            texts = [convert(t, tokenizer) if t else t for t in texts]
        return tokenizer(texts, truncation=False, add_special_tokens=False).input_ids

    def chunks(self, tokenizer: Any, text: str, protected_prefix: str = "") -> list[_Chunk]:
        """A1111's `tokenize_line`: (token, weight) runs cut into 75-token chunks."""
        parsed = parse_prompt_attention(text)
        protect = [False] * len(parsed)
        if protected_prefix:
            parsed = [(protected_prefix, 1.0), *parsed]
            protect = [True, *protect]
        tokenized = self._tokenize(tokenizer, [t if (t, w) != BREAK_MARK else "" for t, w in parsed])
        comma = tokenizer.convert_tokens_to_ids(",</w>")
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

        chunks: list[_Chunk] = []
        chunk = _Chunk()
        last_comma = -1

        def next_chunk() -> None:
            nonlocal chunk, last_comma
            fill = CHUNK_LENGTH - len(chunk.tokens)
            chunk.tokens += [eos] * fill
            chunk.multipliers += [1.0] * fill
            chunk.protected += [False] * fill
            ids = [bos, *chunk.tokens, eos]
            first_end = ids.index(eos, 1)
            ids[first_end + 1:] = [pad] * (len(ids) - first_end - 1)
            chunk.tokens = ids
            chunk.multipliers = [1.0, *chunk.multipliers, 1.0]
            # <bos> before the safety tokens is theirs too (constant under causal attention)
            chunk.protected = [bool(protected_prefix) and not chunks, *chunk.protected, False]
            chunks.append(chunk)
            chunk = _Chunk()
            last_comma = -1

        for tokens, (piece, weight), guarded in zip(tokenized, parsed, protect, strict=True):
            if (piece, weight) == BREAK_MARK:
                next_chunk()
                continue
            for token in tokens:
                if token == comma:
                    last_comma = len(chunk.tokens)
                elif (len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                      and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK):
                    cut = last_comma + 1
                    moved = (chunk.tokens[cut:], chunk.multipliers[cut:], chunk.protected[cut:])
                    del chunk.tokens[cut:], chunk.multipliers[cut:], chunk.protected[cut:]
                    next_chunk()
                    chunk.tokens, chunk.multipliers, chunk.protected = (list(x) for x in moved)
                if len(chunk.tokens) == CHUNK_LENGTH:
                    next_chunk()
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                chunk.protected.append(guarded)
        if chunk.tokens or not chunks:
            next_chunk()
        return chunks

    # -- encoders -----------------------------------------------------------------------------

    def _hidden(self, encoder: Any, ids: torch.Tensor, second: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = encoder(ids, output_hidden_states=self.layer is not None)
        pooled = out.text_embeds if second else None
        if self.layer is None:
            return out.last_hidden_state, pooled
        z = out.hidden_states[self.layer]
        if not self.sdxl:
            norm = getattr(encoder, "final_layer_norm", None) or encoder.text_model.final_layer_norm
            z = norm(z)
        return z, pooled

    def _encode_chunks(self, chunks: list[_Chunk], encoder: Any, second: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = encoder.device
        zs, pooled = [], None
        for i, chunk in enumerate(chunks):
            ids = torch.tensor([chunk.tokens], device=device)
            z, pool = self._hidden(encoder, ids, second)
            if i == 0:
                pooled = pool
            weights = torch.tensor(chunk.multipliers, device=device, dtype=z.dtype)
            if bool((weights != 1).any()):
                weighted = z * weights[None, :, None]
                ratio = z.mean() / weighted.mean()
                # A1111 divides by the weighted mean unguarded; a mean near zero (never seen on real CLIP,
                # whose hidden states have a large mean, but possible on other weights) would blow the
                # chunk up to inf, so such a chunk keeps its weights without the rescale
                if bool(torch.isfinite(ratio)) and MIN_RESCALE <= float(ratio) <= MAX_RESCALE:
                    weighted = weighted * ratio
                keep = torch.tensor(chunk.protected, device=device)
                z = torch.where(keep[None, :, None], z, weighted)
            zs.append(z)
        return torch.cat(zs, dim=1), pooled

    @torch.no_grad()
    def encode(self, text: str, protected_prefix: str = "") -> Conditioning:
        per_encoder, pooled = [], None
        tokenized = [self.chunks(tok, text, protected_prefix) for tok, _ in self.slots]
        count = max(len(c) for c in tokenized)
        for k, ((tokenizer, encoder), chunks) in enumerate(zip(self.slots, tokenized, strict=True)):
            while len(chunks) < count:  # both SDXL encoders see the same number of chunks
                chunks.append(self.chunks(tokenizer, "")[0])
            z, pool = self._encode_chunks(chunks, encoder, second=k == 1)
            per_encoder.append(z)
            pooled = pool if pool is not None else pooled
        return Conditioning(torch.cat(per_encoder, dim=-1), pooled)

    def pad_to(self, cond: Conditioning, chunks: int) -> Conditioning:
        """`cond` followed by empty-prompt chunks up to `chunks` chunks."""
        if cond.chunks >= chunks:
            return cond
        if not self._empty:
            self._empty[0] = (self.encode("").embeds, None)
        empty = self._empty[0][0].to(cond.embeds.dtype)
        return Conditioning(torch.cat([cond.embeds, *[empty] * (chunks - cond.chunks)], dim=1), cond.pooled)


@dataclass(frozen=True)
class ScheduledConditioning:
    """The positive and negative conditionings at every sampling step of one pass (prompt editing and
    alternation change them between steps), padded to one length."""

    positive: list[tuple[int, Conditioning]]  # (last step, conditioning), as `prompt_schedule`
    negative: list[tuple[int, Conditioning]]
    steps: int

    @staticmethod
    def _at(schedule: list[tuple[int, Conditioning]], step: int) -> Conditioning:
        for end, cond in schedule:
            if step <= end:
                return cond
        return schedule[-1][1]

    def at(self, step: int) -> tuple[Conditioning, Conditioning]:
        """(positive, negative) at 1-based sampling `step`."""
        return self._at(self.positive, step), self._at(self.negative, step)

    @property
    def varies(self) -> bool:
        return len(self.positive) > 1 or len(self.negative) > 1

    def pipeline_kwargs(self) -> dict[str, torch.Tensor]:
        """The embeddings a diffusers SD1/SDXL pipeline takes instead of prompt strings (step 1's)."""
        pos, neg = self.at(1)
        kwargs = {"prompt_embeds": pos.embeds, "negative_prompt_embeds": neg.embeds}
        if pos.pooled is not None:
            kwargs.update(pooled_prompt_embeds=pos.pooled, negative_pooled_prompt_embeds=neg.pooled)
        return kwargs

    def callback_tensors(self, sdxl: bool) -> list[str]:
        return ["prompt_embeds", "add_text_embeds"] if sdxl else ["prompt_embeds"]

    def step_update(self, step: int, guidance: bool, batch: int = 1) -> dict[str, torch.Tensor]:
        """The callback outputs that switch the pipeline to `step`'s conditioning in the pipeline's batched
        form: each repeated `batch` times, negatives first under classifier-free guidance (as diffusers
        concatenates them)."""
        pos, neg = self.at(step)

        def batched(p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            p, n = p.repeat_interleave(batch, dim=0), n.repeat_interleave(batch, dim=0)
            return torch.cat([n, p]) if guidance else p

        out = {"prompt_embeds": batched(pos.embeds, neg.embeds)}
        if pos.pooled is not None:
            out["add_text_embeds"] = batched(pos.pooled, neg.pooled)
        return out


def encode_scheduled(encoder: PromptEncoder, *, prompt: str, negative: str, protected_negative_prefix: str,
                     steps: int) -> ScheduledConditioning:
    """Both prompts' schedules encoded (each distinct text once) and padded to one chunk count."""
    from genserve.engine.prompt_syntax import prompt_schedule

    cache: dict[tuple[str, str], Conditioning] = {}

    def enc(text: str, prefix: str) -> Conditioning:
        if (text, prefix) not in cache:
            cache[(text, prefix)] = encoder.encode(text, prefix)
        return cache[(text, prefix)]

    pos = [(end, enc(text, "")) for end, text in prompt_schedule(prompt, steps)]
    neg = [(end, enc(text, protected_negative_prefix)) for end, text in prompt_schedule(negative, steps)]
    chunks = max(c.chunks for _, c in pos + neg)
    pad = {id(c): encoder.pad_to(c, chunks) for _, c in pos + neg}
    return ScheduledConditioning([(e, pad[id(c)]) for e, c in pos], [(e, pad[id(c)]) for e, c in neg], steps)
