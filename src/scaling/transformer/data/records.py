"""Finetuning records -> token ids and loss masks: the one definition of what a model learns to write.

Two readers turn records into training samples: ``FinetuningDataset`` (JSONL files for ``scaling train``) and
``scaling.loaders.LlamaLoader`` (any in-memory dataset for a plain PyTorch loop). If each kept its own copy,
a chat record could be rendered or masked one way in one path and another way in the other, and the same
model trained through both would learn different things. Both call these functions instead.

A record is ``{"prompt": ..., "completion": ...}`` (learn the completion) or ``{"messages": [{"role",
"content"}, ...]}`` (learn the assistant messages; each message is rendered ``"<role>: <content>\\n"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from scaling.core.data import DataFileError
from scaling.transformer.data.tokenizer import Tokenizer

__all__ = ["Piece", "encode_pieces", "pieces_of"]

Piece = tuple[str, bool]
"""A stretch of text and whether the model is trained to write it (its tokens carry loss)."""


def pieces_of(record: Mapping[str, object], where: str) -> list[Piece]:
    """The text pieces of ``record`` in order, each with whether it is learned.

    ``where`` names the record in errors (``"data.jsonl:3"``, ``"dataset[3]"``): a bad record raises one
    ``DataFileError`` (a ``ValueError``) saying where it is and which field is missing or malformed.
    """
    if "prompt" in record or "completion" in record:
        for field in ("prompt", "completion"):
            if field not in record:
                raise DataFileError(f"{where}: no field {field!r} (a prompt/completion record needs both)")
        return [(str(record["prompt"]), False), (str(record["completion"]), True)]
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise DataFileError(f"{where}: field 'messages' is not a list")
        pieces: list[Piece] = []
        for turn, message in enumerate(messages):
            missing = [f for f in ("role", "content") if not isinstance(message, Mapping) or f not in message]
            if missing:
                raise DataFileError(
                    f"{where}: message {turn} has no field {missing[0]!r} (every message needs 'role' and 'content')"
                )
            pieces.append((f"{message['role']}: ", False))
            pieces.append((f"{message['content']}\n", message["role"] == "assistant"))
        return pieces
    raise DataFileError(
        f"{where}: expected 'prompt' and 'completion', or 'messages' (fields here: {', '.join(record) or 'none'})"
    )


def encode_pieces(pieces: Sequence[Piece], tokenizer: Tokenizer, eos: int) -> tuple[list[int], list[float]]:
    """Token ids of the pieces followed by ``eos``, and per id 1.0 where it is learned, else 0.0.

    Each piece is encoded on its own, so no token straddles a prompt/completion boundary and the mask is
    exact. The appended end of sequence is learned: a model that never learns to stop writes on forever.
    """
    ids: list[int] = []
    mask: list[float] = []
    for text, learn in pieces:
        encoded = tokenizer.encode(text)
        ids += encoded
        mask += [1.0 if learn else 0.0] * len(encoded)
    return [*ids, eos], [*mask, 1.0]
