"""Loading a model's tokenizer on the client (transformers is optional)."""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=16)
def load_tokenizer(name: str):
    """The Hugging Face tokenizer named by a model or tokenizer id (or a local folder).

    A variant suffix after ':' (e.g. `org/model:peft:262144`) is dropped unless the name is
    an existing path.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError(
            "get_tokenizer() needs the `transformers` package: pip install transformers"
        ) from e
    if ":" in name and not os.path.exists(name):
        name = name.split(":", 1)[0]
    return AutoTokenizer.from_pretrained(name)
