"""The chat template, rendered in one place: prompts ready for the assistant's turn, and prompt + reply token ids."""
from __future__ import annotations


def render_prompt(tokenizer, conversation: str | list[dict]) -> str:
    """The conversation (a user prompt, or a list of {role, content} messages) in the tokenizer's chat template,
    ending where the assistant's reply begins."""
    messages = [{"role": "user", "content": conversation}] if isinstance(conversation, str) else conversation
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_ids(tokenizer, conversation: str | list[dict], max_len: int | None = None) -> list[int]:
    """`render_prompt` as token ids; a conversation longer than `max_len` loses its beginning."""
    ids = tokenizer(render_prompt(tokenizer, conversation), add_special_tokens=False)["input_ids"]
    return ids[-max_len:] if max_len else ids


def prompt_and_reply_ids(tokenizer, prompt: str, reply: str) -> tuple[list[int], list[int]]:
    """Token ids of a one-turn conversation, split exactly where the reply starts: (prompt, reply + closing tokens).

    The prompt and the reply are tokenized apart, so the boundary is exact whatever the tokenizer merges.
    """
    prompt_text = render_prompt(tokenizer, prompt)
    full_text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
                                              tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template renders the prompt differently inside a whole conversation, so the "
                         "reply's tokens cannot be told from the prompt's. Use a model whose template renders a "
                         "conversation's prompt the same way as the prompt alone (ChatML-style templates do).")
    return (tokenizer(prompt_text, add_special_tokens=False)["input_ids"],
            tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"])


def reply_suffix(tokenizer) -> list[int]:
    """Tokens the chat template puts after an assistant reply's EOS (ChatML: the newline)."""
    user = [{"role": "user", "content": "x"}]
    prompt = render_prompt(tokenizer, user)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "y"}], tokenize=False)
    tail = full[len(prompt) + 1:]  # after the reply "y"
    eos = tokenizer.eos_token
    return tokenizer(tail[len(eos):], add_special_tokens=False)["input_ids"] if tail.startswith(eos) else []


def template_tokens(tokenizer) -> int:
    """Tokens the template adds to a one-turn conversation with an empty prompt and reply (role tags, system prompt)."""
    empty = tokenizer.apply_chat_template([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
                                          tokenize=False)
    return len(tokenizer(empty, add_special_tokens=False)["input_ids"])
