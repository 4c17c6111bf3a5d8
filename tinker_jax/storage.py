"""Where checkpoint folders live: a local folder or a Google Cloud Storage prefix.

A location is text, as the server's configuration and database hold it: an absolute local
path, or `gs://BUCKET[/PATH]`. Both become `etils.epath.Path`, the path type Orbax itself
takes, so the checkpoint code is written once for both. `gs://` needs the `gcs` extra: epath
reads and writes small files through gcsfs, while Orbax writes arrays through tensorstore's
own GCS driver. Both find credentials the standard Google way (the VM's service account on a
Cloud TPU VM, `GOOGLE_APPLICATION_CREDENTIALS` elsewhere); `STORAGE_EMULATOR_HOST` (gcsfs)
and `TENSORSTORE_GCS_HTTP_URL` (tensorstore) point them at an emulator instead.

Object storage is not a file system in two ways the checkpoint writer must know about, so
`is_local` tells them apart: a "folder" is only a name prefix (it exists once an object
under it does), and nothing can be renamed atomically.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat

from etils import epath

from tinker_jax.errors import ValidationError

log = logging.getLogger("tinker_jax.storage")

GCS_SCHEME = "gs://"
# Bucket names: 3-63 characters (222 with dots), lowercase letters, digits, -, _ and .
_GCS_RE = re.compile(r"gs://[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9](/[^\x00-\x1f]*)?")


def resolve(location: str | os.PathLike, field: str = "path") -> epath.Path:
    """The path a location names: a local path made absolute (Orbax requires it), or a
    `gs://` path. Any other URL, or a malformed bucket name, is a ValidationError on
    `field`."""
    text = os.fspath(location)
    if text.startswith(GCS_SCHEME):
        if not _GCS_RE.fullmatch(text):
            raise ValidationError(field, f"{text!r} is not gs://BUCKET[/PATH] with a valid bucket")
        try:
            import gcsfs  # noqa: F401 - epath's backend for gs://
        except ImportError:
            raise ValidationError(
                field, f"{text}: gs:// storage needs the gcs extra (pip install 'tinker-jax[gcs]')"
            ) from None
        _no_listing_cache()
        return epath.Path(text.rstrip("/"))
    if "://" in text:
        raise ValidationError(field, f"{text}: only local folders and gs:// are supported")
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_local(path: epath.Path) -> bool:
    """Whether `path` is on a file system (with directories and atomic rename)."""
    return not os.fspath(path).startswith(GCS_SCHEME)


def _no_listing_cache() -> None:
    """Turns off gcsfs's cache of listings (unless the user configured it): tensorstore and
    the other hosts write objects behind its back, so a cached listing would miss them (a
    removal would leave them behind)."""
    import fsspec

    fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


def remove_tree(location: str | os.PathLike) -> None:
    """Deletes the folder at `location` and everything under it; nothing if it is absent.
    Errors are logged, not raised: the caller has already forgotten the folder, and one left
    behind is removed at the next start-up's sweep."""
    path = resolve(location)
    try:
        if is_local(path):
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.rmtree()
    except Exception as e:  # noqa: BLE001 - object-store clients raise many types
        log.warning("could not remove %s: %s", path, e)


def copy_tree(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copies the folder at `source` to `target`, which must not exist. On a local file
    system each file is hard-linked where it can be (a checkpoint's files are never changed
    after they are written, so both folders share the bytes, and removing either leaves the
    other whole), else copied; on object storage every object is copied."""
    src, dst = resolve(source), resolve(target)
    if is_local(src) and is_local(dst):
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        return
    import fsspec  # lists objects under a prefix (epath's recursive glob refuses gs://)

    fs, root = fsspec.core.url_to_fs(os.fspath(src))
    for found in fs.find(root):
        name = found.removeprefix(root).lstrip("/")
        if is_local(dst):
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).copy(dst / name)


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link `dst` to `src`, or a copy where linking is refused (another device)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def file_sizes(location: str | os.PathLike) -> dict[str, int]:
    """Every regular file (object) under the folder at `location`, by its path relative to
    the folder ('/'-separated), with its size in bytes; empty when there is none. Local
    symlinks are not followed."""
    path = resolve(location)
    if not is_local(path):
        import fsspec

        fs, root = fsspec.core.url_to_fs(os.fspath(path))
        found = fs.find(root, detail=True)
        return {
            name.removeprefix(root).lstrip("/"): int(info["size"])
            for name, info in sorted(found.items())
            if info.get("type") == "file"
        }
    sizes: dict[str, int] = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            st = os.lstat(full)
            if stat.S_ISREG(st.st_mode):
                sizes[os.path.relpath(full, path).replace(os.sep, "/")] = st.st_size
    return dict(sorted(sizes.items()))


def tree_size(path: epath.Path) -> int:
    """Total bytes of the regular files (objects) under `path`; local symlinks are not
    followed."""
    if not is_local(path):
        import fsspec

        fs, root = fsspec.core.url_to_fs(os.fspath(path))
        return int(fs.du(root, total=True))
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            st = os.lstat(os.path.join(root, f))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total
