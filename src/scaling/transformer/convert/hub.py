"""Upload an exported folder to the Hugging Face Hub.

``huggingface_hub`` is optional: it is imported only here, when an upload is asked for. The token comes
from the argument, else ``HF_TOKEN``, else the one ``huggingface-cli login`` stored; without one the
upload fails before anything is sent, with a message that says how to provide it.
"""

from __future__ import annotations

import os
from pathlib import Path

from scaling.transformer.convert.errors import ConversionError

__all__ = ["push_to_hub"]


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = True,
    commit_message: str = "Upload model converted with scaling",
) -> str:
    """Create ``repo_id`` (a model repo; private by default; kept if it exists) and upload ``folder`` to it.

    Returns the commit URL. Raises ``ConversionError`` when ``huggingface_hub`` is missing, no token is
    found, or ``folder`` is not an exported model (no ``config.json``).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{folder} has no config.json: export a checkpoint with save_huggingface first")
    try:
        import huggingface_hub
    except ImportError:
        raise ConversionError("uploading needs the huggingface_hub package: pip install huggingface_hub") from None
    token = token or os.environ.get("HF_TOKEN") or huggingface_hub.get_token()
    if not token:
        raise ConversionError("no Hugging Face token: pass token=..., set HF_TOKEN, or run `huggingface-cli login`")
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message=commit_message
    )
    return str(getattr(commit, "commit_url", commit))
