"""Passkey retrieval ("needle in a haystack") over a compressed cache.

A random 5-digit number (the pass key) is planted at a given depth of a haystack of held-out evaluation text; the
chat prompt then asks for it, the assistant turn is primed with "The special magic number is", and the answer is
decoded greedily; it is correct when its first run of digits is the key.

The prompt is split in two chunks: the context (instructions + haystack with the needle) is prefilled exactly and
shared between methods (:mod:`.replay`); the question chunk and every generated token then attend to the method's
cache, where the needle is compressed (it lies outside the sinks and the recent window). Prefilling the question
together with the context would let the first answer token be computed without any compressed token, as it is in
single-turn ``generate``; the split is the multi-turn case (a document cached earlier, a question asked later).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from ..compat import cache_kwarg
from .replay import capture_prefill, replay_prefill

# RULER-style wording: with "pass key" in a haystack of Python documentation, SmolLM2-135M explains Python's
# `pass` instead of retrieving the number even in full precision; the "special magic number" wording it retrieves.
INTRO = "Below is some text. Somewhere in it there is a special magic number. Find it and remember it.\n\n"
NEEDLE = "\n\nThe special magic number is {key}.\n\n"
QUESTION = "\n\nWhat is the special magic number mentioned in the text above? Answer with the number only."
ANSWER_PRIMER = "The special magic number is"
PLACEHOLDER = "<<SPECTRALKV_HAYSTACK>>"


@dataclass
class NeedleSettings:
    """Passkey-retrieval settings.

    Args:
        context_tokens: tokens of the context chunk (instructions + haystack + needle).
        depths: relative positions of the needle in the haystack.
        trials: prompts per depth (different haystack text and pass key each).
        max_new_tokens: greedy tokens generated for the answer.
        batch_size: prompts run together.
        seed: seed of the pass keys.
    """

    context_tokens: int = 2048
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    trials: int = 2
    max_new_tokens: int = 7
    batch_size: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        self.depths = tuple(float(d) for d in self.depths)
        if any(not 0 <= d <= 1 for d in self.depths) or not self.depths:
            raise ValueError(f"`depths` must be non-empty values in [0, 1], got {self.depths}.")
        for name in ("context_tokens", "trials", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class NeedlePrompt:
    context: torch.Tensor  # [context_tokens]
    question: torch.Tensor  # [q]
    passkey: str
    depth: float


@dataclass
class NeedleOutcome:
    depth: float
    passkey: str
    answer: str

    @property
    def correct(self) -> bool:
        found = re.search(r"\d+", self.answer)
        return found is not None and found.group(0) == self.passkey


@dataclass
class NeedleResult:
    outcomes: dict[str, list[NeedleOutcome]] = field(default_factory=dict)

    def summary(self, label: str) -> dict[str, Any]:
        rows = self.outcomes[label]
        by_depth: dict[str, list[bool]] = {}
        for r in rows:
            by_depth.setdefault(f"{r.depth:g}", []).append(r.correct)
        return {
            "accuracy": sum(r.correct for r in rows) / len(rows),
            "correct": sum(r.correct for r in rows),
            "total": len(rows),
            "by_depth": {d: sum(v) / len(v) for d, v in by_depth.items()},
            "answers": [{"depth": r.depth, "passkey": r.passkey, "answer": r.answer} for r in rows],
        }


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat_parts(tokenizer: Any) -> tuple[str, str]:
    """Text before and after the user message in the tokenizer's chat template (ChatML when it has none)."""
    messages = [{"role": "user", "content": PLACEHOLDER}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except (ValueError, AttributeError):
        text = f"<|im_start|>user\n{PLACEHOLDER}<|im_end|>\n<|im_start|>assistant\n"
    before, after = text.split(PLACEHOLDER)
    return before, after


def build_prompts(tokenizer: Any, haystack: torch.Tensor, settings: NeedleSettings) -> list[NeedlePrompt]:
    """Prompts of identical length (so they batch without padding), one per depth and trial."""
    before, after = _chat_parts(tokenizer)
    head = _ids(tokenizer, before + INTRO)
    question = torch.tensor(_ids(tokenizer, QUESTION + after + ANSWER_PRIMER))
    g = torch.Generator().manual_seed(settings.seed)
    prompts = []
    for i, (_, depth) in enumerate((t, d) for t in range(settings.trials) for d in settings.depths):
        key = str(int(torch.randint(10_000, 100_000, (1,), generator=g)))
        needle = _ids(tokenizer, NEEDLE.format(key=key))
        n_hay = settings.context_tokens - len(head) - len(needle)
        if n_hay < 16:
            raise ValueError(f"`context_tokens` {settings.context_tokens} leaves no room for a haystack.")
        if len(haystack) < n_hay:
            raise ValueError(f"The haystack text has {len(haystack)} tokens; {n_hay} are needed.")
        start = (i * 7919) % (len(haystack) - n_hay + 1)  # a different stretch of text for every prompt
        hay = haystack[start : start + n_hay].tolist()
        cut = round(depth * n_hay)
        prompts.append(NeedlePrompt(torch.tensor(head + hay[:cut] + needle + hay[cut:]), question, key, depth))
    return prompts


def needle_retrieval(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[NeedlePrompt],
    factories: Mapping[str, Callable[[], Cache]],
    settings: NeedleSettings,
    *,
    progress: bool = True,
) -> NeedleResult:
    """Greedy answers of every prompt under every cache factory."""
    device = next(model.parameters()).device
    result = NeedleResult({name: [] for name in factories})
    batches = range(0, len(prompts), settings.batch_size)
    bar = tqdm(total=len(batches) * len(factories), desc="needle", unit="run", disable=not progress)
    key = cache_kwarg(model)
    with torch.inference_mode():
        for start in batches:
            chunk = prompts[start : start + settings.batch_size]
            context = torch.stack([p.context for p in chunk]).to(device)
            question = torch.stack([p.question for p in chunk]).to(device)
            captured = capture_prefill(model, context)
            for name, factory in factories.items():
                bar.set_postfix_str(name)
                cache, _ = replay_prefill(model, factory, captured)
                out = model(input_ids=question, **{key: cache}, use_cache=True, logits_to_keep=1)
                generated = []
                for step in range(settings.max_new_tokens):
                    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                    generated.append(nxt)
                    if step + 1 < settings.max_new_tokens:
                        out = model(input_ids=nxt, **{key: cache}, use_cache=True)
                tokens = torch.cat(generated, 1).cpu()
                for p, row in zip(chunk, tokens, strict=True):
                    answer = tokenizer.decode(row.tolist(), skip_special_tokens=True)
                    result.outcomes[name].append(NeedleOutcome(p.depth, p.passkey, answer))
                bar.update()
                del cache
            del captured
    bar.close()
    return result
