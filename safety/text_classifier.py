"""Slot for a semantic text classifier: an ONNX model at a configured path, run by onnxruntime.

Rules catch what they name; a classifier trained on labelled prompts catches paraphrases no list
has. It is optional (`text_classifier:` in `prompt_audit.yaml`); when configured it runs on every
audit and each label whose probability reaches its threshold adds a reason (`classifier.<label>`),
its signals (so combinations see them) and, if set, its own action.

The model contract:
- input: one float32 tensor of shape `[1, D]` (D fixed in the model; a leading dynamic batch axis is
  fine): a hashed bag of words of the PROMPT. The prompt is normalised and tokenised exactly as the
  rules see it (`safety.normalize`: look-alikes folded, leetspeak folded, lower case); every token and
  every pair of adjacent tokens ("tok1 tok2") adds 1.0 at index `crc32(utf-8 bytes) % D`. The
  vector is then scaled to unit L2 length (all zeros for an empty prompt).
- output: the model's first output, float32 `[1, L]`: one probability in [0, 1] per label, in the
  order of `labels` in the config. L must equal the number of configured labels.
A wrong shape or an unreadable model is an error at start (`RulesInvalid`), never a silent skip; a
failing run raises, so the request fails closed.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from safety.errors import RulesInvalid
from safety.normalize import normalize
from safety.tokens import tokenize


class ClassifierLabel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[a-z0-9_]+$")
    message: str = ""
    threshold: float = Field(gt=0.0, lt=1.0)
    signals: list[str] = []
    action: Literal["block", "review"] | None = None


class ClassifierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str  # relative to the rules folder, or absolute
    labels: list[ClassifierLabel] = Field(min_length=1)


@dataclass(frozen=True)
class Flagged:
    label: ClassifierLabel
    probability: float


def hashed_features(text: str, dim: int) -> np.ndarray:
    """The model input for `text` (see the module docstring); shape [1, dim], float32."""
    words = tokenize(normalize(text)).canon
    vec = np.zeros((1, dim), dtype=np.float32)
    for feature in (*words, *(f"{a} {b}" for a, b in zip(words, words[1:], strict=False))):
        vec[0, zlib.crc32(feature.encode("utf-8")) % dim] += 1.0
    norm = float(np.linalg.norm(vec))
    return vec / norm if norm else vec


class TextClassifier:
    def __init__(self, config: ClassifierConfig, session, input_name: str, dim: int):
        self.config = config
        self._session = session
        self._input = input_name
        self.dim = dim

    @classmethod
    def load(cls, config: ClassifierConfig, rules_dir: Path | None) -> TextClassifier:
        import onnxruntime as ort

        path = Path(config.path)
        if not path.is_absolute() and rules_dir is not None:
            path = Path(rules_dir) / path
        try:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1  # one audit is tiny; threads would only add overhead
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise RulesInvalid(f"text classifier {path}: {exc}") from exc
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(float)" or len(inputs[0].shape) != 2 \
                or not isinstance(inputs[0].shape[1], int):
            raise RulesInvalid(f"text classifier {path}: expected one float32 input of shape [1, D]")
        dim = inputs[0].shape[1]
        probe = session.run(None, {inputs[0].name: np.zeros((1, dim), dtype=np.float32)})[0]
        if probe.shape != (1, len(config.labels)) or outputs[0].type != "tensor(float)":
            raise RulesInvalid(f"text classifier {path}: output shape {probe.shape} does not match "
                               f"{len(config.labels)} configured labels")
        return cls(config, session, inputs[0].name, dim)

    def probabilities(self, prompt: str) -> list[float]:
        out = self._session.run(None, {self._input: hashed_features(prompt, self.dim)})[0]
        return [float(p) for p in out[0]]

    def flagged(self, prompt: str) -> list[Flagged]:
        """Labels at or above their threshold."""
        return [Flagged(label, p) for label, p in zip(self.config.labels, self.probabilities(prompt), strict=True)
                if p >= label.threshold]
