"""`tinker://` checkpoint paths and checkpoint names: the one place that parses and checks them.

A path is `tinker://<run_id>/<kind>/<name>`: `run_id` is a training run's model id
(`<session uuid>:train:<n>`), `kind` says what was saved (`weights` = training state,
`sampler_weights` = adapter only) and `name` is the user's checkpoint name. Names and run ids
end up in storage locations, so both are restricted to a small ASCII alphabet; anything else
is a `ValidationError` naming the request field, never a crash or a path outside the store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tinker_jax.errors import ValidationError

CHECKPOINT_KINDS = {
    "weights": "training",
    "sampler_weights": "sampler",
    "external_weights": "external",
}

SCHEME = "tinker://"
PATH_FORM = f"{SCHEME}<run_id>/<kind>/<name> with kind one of {'|'.join(CHECKPOINT_KINDS)}"
MAX_NAME_LENGTH = 128
MAX_RUN_ID_LENGTH = 128

# A name may not start with "." (hidden files, "." and "..") or "-" (read as an option by CLIs).
NAME_FORM = f"1-{MAX_NAME_LENGTH} characters of [A-Za-z0-9._-], not starting with '.' or '-'"
_NAME = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9._-]{{0,{MAX_NAME_LENGTH - 1}}}")
RUN_ID_FORM = f"1-{MAX_RUN_ID_LENGTH} characters of [A-Za-z0-9:_-]"
_RUN_ID = re.compile(rf"[A-Za-z0-9:_-]{{1,{MAX_RUN_ID_LENGTH}}}")
# Longer than any valid path; checked first so a huge input costs no parsing.
_MAX_PATH_LENGTH = len(SCHEME) + MAX_RUN_ID_LENGTH + len("/sampler_weights/") + MAX_NAME_LENGTH


def _preview(value: object) -> str:
    """A short, printable rendering of an input for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validate_name(name: str, field: str = "name") -> str:
    """Returns `name` if it is a valid checkpoint name, else raises ValidationError(field)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValidationError(field, f"expected {NAME_FORM}, got {_preview(name)}")
    return name


@dataclass(frozen=True)
class TinkerPath:
    """A parsed checkpoint path; constructing one checks every part."""

    run_id: str
    kind: str
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str) or not _RUN_ID.fullmatch(self.run_id):
            raise ValidationError("run_id", f"expected {RUN_ID_FORM}, got {_preview(self.run_id)}")
        if self.kind not in CHECKPOINT_KINDS:
            raise ValidationError(
                "kind", f"expected one of {sorted(CHECKPOINT_KINDS)}, got {_preview(self.kind)}"
            )
        validate_name(self.name)

    @property
    def checkpoint_id(self) -> str:
        """`<kind>/<name>`, the id the checkpoint routes of the HTTP API use."""
        return f"{self.kind}/{self.name}"

    @property
    def checkpoint_type(self) -> str:
        """Tinker's checkpoint type: "training" for weights/, "sampler" for sampler_weights/."""
        return CHECKPOINT_KINDS[self.kind]

    def __str__(self) -> str:
        return f"{SCHEME}{self.run_id}/{self.kind}/{self.name}"

    @classmethod
    def parse(cls, text: str, field: str = "path") -> TinkerPath:
        """Parses exactly `tinker://<run_id>/<kind>/<name>`; errors name `field`."""
        if not isinstance(text, str) or len(text) > _MAX_PATH_LENGTH:
            raise ValidationError(field, f"expected {PATH_FORM}, got {_preview(text)}")
        parts = text.removeprefix(SCHEME).split("/") if text.startswith(SCHEME) else []
        if len(parts) != 3:
            raise ValidationError(field, f"expected {PATH_FORM}, got {_preview(text)}")
        try:
            return cls(*parts)
        except ValidationError as err:
            raise ValidationError(
                field, f"expected {PATH_FORM}, got {_preview(text)} ({err})"
            ) from None
