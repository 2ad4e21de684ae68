"""Prompt templates: how an instruction and its context become a prompt, and what the model answers.

Two formats: the Alpaca template (plain text, for base models), and the tokenizer's own chat
template (for models that ship one, such as the built-in model). Both split a training example into
a *prompt* and a *completion* (the response and the end-of-sequence marker), so that training can
put its loss on the completion only and generation can stop where training taught it to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fedexperts.errors import DataError

TemplateName = Literal["auto", "alpaca", "chat"]

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_CONTEXT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class PromptTemplate:
    kind: Literal["alpaca", "chat"]

    @property
    def add_special_tokens(self) -> bool:
        """Whether the tokenizer should add its own special tokens (a chat template writes them itself)."""
        return self.kind == "alpaca"

    def prompt(self, tokenizer: Any, instruction: str, context: str) -> str:
        """The text the model is given; generation continues from its end."""
        if self.kind == "alpaca":
            template = ALPACA_PROMPT if context else ALPACA_PROMPT_NO_CONTEXT
            return template.format(instruction=instruction, context=context)
        return str(
            tokenizer.apply_chat_template(_messages(instruction, context), add_generation_prompt=True, tokenize=False)
        )

    def completion(self, tokenizer: Any, instruction: str, context: str, response: str) -> str:
        """The text that follows the prompt in training: the response and the end-of-sequence marker."""
        eos = tokenizer.eos_token or ""
        if self.kind == "alpaca":
            return response + eos
        prompt = self.prompt(tokenizer, instruction, context)
        conversation = [*_messages(instruction, context), {"role": "assistant", "content": response}]
        full = str(tokenizer.apply_chat_template(conversation, tokenize=False))
        if not full.startswith(prompt):
            raise DataError(
                "the tokenizer's chat template does not render the prompt as the start of the conversation, "
                "so the response cannot be told apart; use the alpaca template"
            )
        completion = full[len(prompt) :]
        return completion if eos in completion else completion + eos


def _messages(instruction: str, context: str) -> list[dict[str, str]]:
    content = f"{instruction}\n\n{context}" if context else instruction
    return [{"role": "user", "content": content}]


def prompt_template(tokenizer: Any, name: TemplateName = "auto") -> PromptTemplate:
    """``auto`` picks the tokenizer's chat template when it has one, else Alpaca."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if name == "chat" and not has_chat:
        raise DataError("template 'chat' asked for, but this tokenizer has no chat template; use 'alpaca'")
    if name not in ("auto", "alpaca", "chat"):
        raise DataError(f"unknown prompt template {name!r}; use auto, alpaca or chat")
    return PromptTemplate("chat" if name == "chat" or (name == "auto" and has_chat) else "alpaca")
