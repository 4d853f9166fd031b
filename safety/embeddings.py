"""Mandatory safety embeddings: textual inversions the server puts at the front of every negative prompt.

Per model family there are two: a general negative embedding, always injected, and a
minor-protection embedding, injected whenever the prompt audit marks the prompt mature. The request
cannot remove, reweight or reorder them: every occurrence of a reserved token (and look-alike or
weighted forms such as `(<GS-SAFE-NEG>:0)` or `<gs‐safe‐neg>_1`) is cut out of the user's prompt AND
negative prompt, then the tokens are prepended, unweighted, so CLIP's 77-token window never truncates
them away.

Files are safetensors only. SD1: `{"emb_params": [n, dim]}`. SDXL: `{"clip_l": [n, d1], "clip_g":
[n, d2]}`, loaded into BOTH text encoders and tokenizers. A multi-vector embedding becomes the tokens
`tok`, `tok_1`, ... and diffusers' `maybe_convert_prompt` expands `tok` in prompts.

A model whose embeddings did not load is not servable: `check(pipe)` raises `EmbeddingUnavailable`
unless every token is in its tokenizer(s) and the text-encoder rows equal the file's vectors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from safety.errors import EmbeddingUnavailable, NotSafetensors
from safety.normalize import normalize

# Which text encoder/tokenizer each key of an embedding file goes into, per family.
FAMILY_KEYS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "sd1": (("emb_params", "text_encoder", "tokenizer"),),
    "sdxl": (("clip_l", "text_encoder", "tokenizer"), ("clip_g", "text_encoder_2", "tokenizer_2")),
}

# Empty syntax left behind once a token is cut out: "()", "(:0)", "[]", "<>", "(:-1.5)" (run on text
# whose whitespace is already collapsed, so every quantifier here is bounded: no backtracking blow-up).
_EMPTY_SYNTAX_RE = re.compile(r"\( ?(?:: ?[-+]?[\d.]*)? ?\)|\[ ?\]|< ?>")
_WHITESPACE_RE = re.compile(r"\s+")
_MAX_CLEANUP_PASSES = 4  # "((<tok>:0))" needs two; deeper leftovers are inert text after our tokens


@dataclass(frozen=True)
class EmbeddingSpec:
    token: str
    path: Path


def token_ids(tokenizer: Any, tokens: Sequence[str]) -> list[int | None]:
    """The vocabulary ids of `tokens`, None for a token the tokenizer does not have. Looks up only
    these tokens: `get_vocab()` copies the whole vocabulary (49,408 entries, ~18 ms holding the GIL),
    which a replica's health check would otherwise do while images are being generated."""
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    unknown = tokenizer.unk_token_id
    return [None if i is None or (i == unknown and t != tokenizer.unk_token) else int(i) for t, i in zip(tokens, ids, strict=True)]


class InjectedPrompts(NamedTuple):
    """What the pipeline is given: the user's prompt without reserved tokens, and the negative prompt
    that starts with the safety tokens."""

    prompt: str
    negative_prompt: str


def uses_reserved_token(token: str, reserved: Sequence[str]) -> bool:
    """Whether a user embedding's `token` contains a mandatory safety token, with or without its
    angle brackets, in any case: such an embedding could stand in for the safety embedding.
    The one rule the ingress (at admission) and the worker (before loading) both apply."""
    token = token.lower()
    return any(r.lower() in token or r.lower().strip("<>") in token for r in reserved if r.strip("<>"))


class SafetyEmbeddings:
    """The safety embeddings of one model family: load, verify and inject them."""

    def __init__(self, family: str, general: EmbeddingSpec, minor: EmbeddingSpec):
        if family not in FAMILY_KEYS:
            raise EmbeddingUnavailable(f"no safety-embedding layout for family {family!r}")
        if general.token == minor.token:
            raise EmbeddingUnavailable("the general and minor-protection tokens must differ")
        self.family = family
        self.general = general
        self.minor = minor
        self._strip_re = re.compile("|".join(_lookalike_pattern(s.token) for s in (general, minor)))

    @classmethod
    def from_config(cls, family: str, config: Mapping[str, Any], models_dir: Path) -> SafetyEmbeddings:
        """From a family's `safety_embeddings` entry of `configs/models.yaml` (files under `models_dir`)."""
        try:
            specs = {kind: EmbeddingSpec(config[kind]["token"], Path(models_dir) / config[kind]["file"]) for kind in ("general", "minor")}
        except (KeyError, TypeError) as exc:
            raise EmbeddingUnavailable(f"family {family!r}: safety_embeddings needs general and minor with token and file") from exc
        return cls(family, specs["general"], specs["minor"])

    @property
    def reserved_tokens(self) -> tuple[str, str]:
        return (self.general.token, self.minor.token)

    # -- files -----------------------------------------------------------------------------------

    def _vectors(self, spec: EmbeddingSpec) -> dict[str, Any]:
        """The tensors of one embedding file, keyed as FAMILY_KEYS says (re-read on every call)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(spec.path)
        if path.suffix != ".safetensors":
            raise NotSafetensors(f"{path}: safety embeddings load from .safetensors files only")
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise EmbeddingUnavailable(f"{spec.token}: cannot read {path}: {exc}") from exc
        want = [key for key, _, _ in FAMILY_KEYS[self.family]]
        if sorted(tensors) != sorted(want) or any(tensors[k].ndim != 2 or not len(tensors[k]) for k in want):
            shapes = {k: list(v.shape) for k, v in tensors.items()}
            raise EmbeddingUnavailable(f"{spec.token}: {path} holds {shapes}; {self.family} needs {want} as [n, dim]")
        if len({len(tensors[k]) for k in want}) != 1:
            raise EmbeddingUnavailable(f"{spec.token}: {path} has a different vector count per encoder")
        return tensors

    @staticmethod
    def _token_names(token: str, n: int) -> list[str]:
        return [token] + [f"{token}_{i}" for i in range(1, n)]

    # -- pipeline --------------------------------------------------------------------------------

    def _encoders(self, pipe: Any) -> list[tuple[str, Any, Any]]:
        out = []
        for key, encoder_attr, tokenizer_attr in FAMILY_KEYS[self.family]:
            encoder, tokenizer = getattr(pipe, encoder_attr, None), getattr(pipe, tokenizer_attr, None)
            if encoder is None or tokenizer is None:
                raise EmbeddingUnavailable(f"{self.family} pipeline has no {encoder_attr}/{tokenizer_attr}")
            out.append((key, encoder, tokenizer))
        return out

    def load_into(self, pipe: Any) -> None:
        """Load both embeddings into every text encoder of `pipe`, then verify them.

        Idempotent: tokens already present are verified, not loaded twice. Load before any compile
        of the text encoders (loading resizes their embedding matrix).
        """
        encoders = self._encoders(pipe)
        for spec in (self.general, self.minor):
            tensors = self._vectors(spec)
            for key, encoder, tokenizer in encoders:
                if token_ids(tokenizer, [spec.token]) != [None]:
                    continue
                try:
                    pipe.load_textual_inversion(tensors[key], token=spec.token, text_encoder=encoder, tokenizer=tokenizer)
                except (ValueError, RuntimeError) as exc:
                    raise EmbeddingUnavailable(f"{spec.token}: loading {spec.path} into {key} failed: {exc}") from exc
        self.check(pipe)

    def check(self, pipe: Any) -> None:
        """Raise `EmbeddingUnavailable` unless every token is in its tokenizer and the rows equal the files."""
        encoders = self._encoders(pipe)
        for spec in (self.general, self.minor):
            tensors = self._vectors(spec)
            for key, encoder, tokenizer in encoders:
                names = self._token_names(spec.token, len(tensors[key]))
                *found, extra = token_ids(tokenizer, [*names, f"{spec.token}_{len(names)}"])
                missing = [t for t, i in zip(names, found, strict=True) if i is None]
                if missing:
                    raise EmbeddingUnavailable(f"{spec.token}: {missing} not in the {key} tokenizer")
                if extra is not None:
                    raise EmbeddingUnavailable(f"{spec.token}: the {key} tokenizer has more vectors than {spec.path}")
                ids = [int(i) for i in found]
                ids_from_text = tokenizer(" ".join(names), add_special_tokens=False).input_ids
                if ids_from_text != ids:
                    raise EmbeddingUnavailable(f"{spec.token}: the {key} tokenizer does not map the token text to its ids")
                weight = encoder.get_input_embeddings().weight
                if max(ids) >= weight.shape[0]:
                    raise EmbeddingUnavailable(f"{spec.token}: the {key} text encoder has no row for it")
                rows = weight.detach()[ids]
                expected = tensors[key].to(device=rows.device, dtype=rows.dtype)
                if rows.shape != expected.shape or not bool((rows == expected).all()):
                    raise EmbeddingUnavailable(f"{spec.token}: the {key} text-encoder rows differ from {spec.path}")

    # -- prompts ---------------------------------------------------------------------------------

    def strip_reserved(self, text: str) -> str:
        """`text` without any form of a reserved token, nor the empty syntax it leaves behind."""
        norm = normalize(text)
        cuts = [norm.span(*m.span()) for m in self._strip_re.finditer(norm.text)]
        if not cuts:
            return text
        pieces, last = [], 0
        for start, end in cuts:
            pieces.append(text[last:start])
            last = end
        pieces.append(text[last:])
        out = _WHITESPACE_RE.sub(" ", " ".join(pieces))
        for _ in range(_MAX_CLEANUP_PASSES):  # nested leftovers: "((<tok>:0))" -> "(:0)" -> ""
            out, n = _EMPTY_SYNTAX_RE.subn("", out)
            if not n:
                break
        return ", ".join(p.strip() for p in out.split(",") if p.strip())

    def inject(self, *, prompt: str, negative_prompt: str, mature: bool) -> InjectedPrompts:
        """The sanitised prompt and the final negative prompt: the safety tokens first, then the user's
        negative (keyword-only: the two prompts are both strings and must never trade places)."""
        tokens = [self.general.token] + ([self.minor.token] if mature else [])
        user_negative = self.strip_reserved(negative_prompt)
        negative = " ".join(tokens) + (", " + user_negative if user_negative else "")
        return InjectedPrompts(prompt=self.strip_reserved(prompt), negative_prompt=negative)


def _lookalike_pattern(token: str) -> str:
    """A regex over NORMALISED text matching the token's words with a few separators of any kind
    between them (so case, look-alike letters, invisible characters or other dashes don't hide it),
    with its angle brackets and a multi-vector suffix such as `_1`; a weight such as `:0` is left for
    the empty-syntax cleanup. Bounded repeats keep it linear on hostile input."""
    parts = re.findall(r"[^\W_]+", normalize(token).text)
    if not parts:
        raise EmbeddingUnavailable(f"reserved token {token!r} has no letters or digits")
    core = r"[\W_]{0,4}".join(re.escape(p) for p in parts)
    return rf"<?{core}>?(?:[_ -]{{1,2}}\d{{1,3}}>?)?"
