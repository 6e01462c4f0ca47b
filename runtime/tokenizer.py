"""Text in, token ids out: a ``tokenizers`` JSON plus the model's chat template (Jinja, sandboxed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeadapt.errors import FormatError, MissingDependencyError


class Tokenizer:
    def __init__(self, path: Path, *, chat_template: str | None = None, special: dict[str, Any] | None = None):
        try:
            from tokenizers import Tokenizer as _T
        except ImportError as e:
            raise MissingDependencyError("text needs the 'tokenizers' package: pip install tokenizers") from e
        try:
            self._tok = _T.from_file(str(path))
        except Exception as e:
            raise FormatError(f"{path}: not a readable tokenizers JSON file: {e}") from e
        self.chat_template = chat_template
        self.special = special or {}
        self.add_bos = bool(self.special.get("add_bos", False))
        self.add_eos = bool(self.special.get("add_eos", False))
        self.bos_token = self.special.get("bos_token")
        self.eos_token = self.special.get("eos_token")

    def encode(self, text: str) -> list[int]:
        """Ids of a raw prompt: special-token strings in the text are those tokens; BOS / EOS as the base decided
        (a base exported from a GGUF: as llama.cpp decides from that file, even before a BOS already in the text)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        bos, eos = self.special.get("bos_token_id"), self.special.get("eos_token_id")
        if self.add_bos and bos is not None:
            ids = [bos] + ids
        if self.add_eos and eos is not None:
            ids = ids + [eos]
        return ids

    def encode_raw(self, text: str) -> list[int]:
        """Ids of text that already carries its special tokens (a rendered chat template)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    @property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes a vocabulary entry is written with: an upper bound on the bytes of text one token
        covers (a byte-level or SentencePiece entry is written with at least the bytes it stands for), so a text
        of B bytes encodes to at least B / max_token_bytes tokens."""
        if not hasattr(self, "_span"):
            self._span = max((len(t.encode("utf-8")) for t in self._tok.get_vocab(with_added_tokens=True)), default=1)
        return self._span

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise FormatError("this base has no chat template; pass chat=False and a plain prompt")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str) -> None:
            raise TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


class StreamDecoder:
    """Turns a growing list of ids into new text pieces, holding back incomplete UTF-8."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids, self.text = tok, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.text = text[len(self.text):], text
        return piece
