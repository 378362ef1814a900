"""Turning request prompts into token ids, and the checks every prompt passes before it reaches the engine."""

from __future__ import annotations

from expertflow.engine.sampling import check_request
from expertflow.errors import ExpertflowError
from expertflow.server.errors import APIError, invalid
from expertflow.server.schemas import ChatMessage

# Used when the tokenizer has no chat template (the embedded model has none): one line per message,
# then the assistant's turn, which the model completes.
PLAIN_CHAT_TEMPLATE = "{role}: {content}\n"
PLAIN_CHAT_PROMPT = "assistant:"


def render_chat(tokenizer, messages: list[ChatMessage]) -> str:
    turns = [{"role": m.role, "content": m.text()} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    return "".join(PLAIN_CHAT_TEMPLATE.format(**t) for t in turns) + PLAIN_CHAT_PROMPT


def encode_text(tokenizer, text: str, param: str) -> list[int]:
    if not text:
        raise invalid(f"{param} is empty: give at least one character of text", param=param, code="empty_prompt")
    try:  # JSON may escape a lone surrogate ("\ud800"): valid JSON, but no text a tokenizer takes
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise invalid(f"{param} must be UTF-8 text, but character {exc.start} is a lone surrogate "
                      "(\\ud800-\\udfff); send the text as UTF-8", param=param, code="invalid_text") from None
    return list(tokenizer(text)["input_ids"])


def encode_prompts(tokenizer, prompt: str | list, vocab_size: int) -> list[list[int]]:
    """A completion's `prompt`: a string, a list of strings, a list of token ids, or a list of those."""
    if isinstance(prompt, str):
        return [encode_text(tokenizer, prompt, "prompt")]
    if not prompt:
        raise invalid("prompt is an empty list: give text or token ids", param="prompt", code="empty_prompt")
    if isinstance(prompt[0], str):
        return [encode_text(tokenizer, p, "prompt") for p in prompt]
    batches = [prompt] if isinstance(prompt[0], int) else prompt
    for ids in batches:
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if not ids or bad:
            raise invalid(f"prompt token ids must be non-empty lists of ids in [0, {vocab_size}); got "
                          f"{'an empty list' if not ids else bad[:3]}", param="prompt", code="invalid_token_ids")
    return [list(ids) for ids in batches]


def token_limit(prompts: list[list[int]], requested: int | None, max_positions: int | None) -> int:
    """The new-token limit for these prompts: `requested`, or what is left of the context without one."""
    longest = max(map(len, prompts))
    limit = requested if requested is not None else (max_positions or longest + 256) - longest
    if requested is not None and requested < 1:
        raise invalid(f"max_tokens must be at least 1, got {requested}", param="max_tokens", code="invalid_value")
    try:
        check_request(prompts, max(limit, 1), max_positions)
    except ExpertflowError as exc:
        raise APIError(400, str(exc), param="max_tokens", code="context_length_exceeded") from exc
    return limit
