"""Hub transport for adapter folders: safe download, push, and atomic local writes.

Model-agnostic: this module moves *folders* of adapter files (JSON configs, safetensors weights, a README) between
disk and the Hugging Face Hub. What the files mean is the business of `video2param.model`.

Safety rule: only ``*.json``, ``*.safetensors`` and ``README.md`` are ever downloaded or pushed
(`ADAPTER_FILE_PATTERNS`); pickles (``.bin``, ``.pt``, ``.pkl``), code (``.py``) and anything else in a repo are
left on the Hub, so loading an adapter can never execute or unpickle remote content.
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import CommitInfo
from huggingface_hub.utils import filter_repo_objects

__all__ = [
    "ADAPTER_FILE_PATTERNS",
    "AdapterNotFoundError",
    "atomic_directory",
    "push_folder",
    "resolve_adapter_dir",
]

#: The only files moved to or from the Hub (fnmatch patterns on repo-relative paths; ``*`` spans folders).
ADAPTER_FILE_PATTERNS: tuple[str, ...] = ("*.json", "*.safetensors", "README.md")

# Git and huggingface_hub bookkeeping folders inside a local folder; `upload_folder` never uploads them either.
_BOOKKEEPING_PATTERNS = [".git/*", "*/.git/*", ".cache/huggingface/*", "*/.cache/huggingface/*"]


class AdapterNotFoundError(FileNotFoundError):
    """An adapter (local folder or Hub repo), its revision, or one of its required files does not exist.

    Attributes:
        location: the local path or Hub repo id that was asked for.
        revision: the Hub revision asked for (``None`` for local folders and the default branch).
        missing: required file names that are absent (empty when the folder/repo/revision itself is missing).
    """

    def __init__(
        self, message: str, *, location: str, revision: str | None = None, missing: Sequence[str] = ()
    ) -> None:
        super().__init__(message)
        self.location = location
        self.revision = revision
        self.missing = tuple(missing)


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Write a directory all-or-nothing.

    Yields an empty temporary directory next to `target` (same filesystem, so renames are atomic). When the block
    finishes without an exception, it takes the place of `target`: an existing `target` is first renamed aside,
    the new directory renamed in, then the old one deleted. When the block raises, the temporary directory is
    removed and an existing `target` is left untouched.

    At every instant `target` is either absent, the complete old directory, or the complete new one, never
    half-written: a crash between the two renames leaves `target` absent and the old copy in a hidden
    ``.<name>.old-*`` sibling.

    Raises:
        NotADirectoryError: `target` exists and is not a directory.
    """
    target = Path(target).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"atomic_directory target {str(target)!r} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_sibling_dir(target, "tmp")
    try:
        yield tmp
    except BaseException:  # also on KeyboardInterrupt / generator close: never leave the temp dir behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_sibling_dir(target: Path, kind: str) -> Path:
    """Create a fresh hidden directory next to `target`.

    Not `tempfile.mkdtemp`: its 0o700 mode would end up on the published directory; `os.mkdir` honours the umask
    like any directory the user creates.
    """
    while True:
        candidate = target.with_name(f".{target.name}.{kind}-{uuid.uuid4().hex[:12]}")
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:  # pragma: no cover - 48 random bits colliding
            continue


def _swap_into_place(new: Path, target: Path) -> None:
    """Rename `new` to `target`, replacing an existing directory without ever exposing a partial one."""
    if not target.exists():
        os.rename(new, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:12]}")
    # Two renames instead of os.replace: replacing a non-empty directory is not portable (fails on Windows and for
    # non-empty targets on POSIX).
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)  # put the previous version back before reporting the failure
        raise
    shutil.rmtree(old, ignore_errors=True)


def _looks_like_local_path(value: str) -> bool:
    """True for strings that can only be paths: absolute, ``./``/``~`` prefixed, backslashes, or >1 slash."""
    return (
        os.path.isabs(value)
        or value.startswith((".", "~"))
        or "\\" in value
        or value.count("/") > 1
    )


def _check_required(
    folder: Path, required_files: Sequence[str], *, where: str, location: str, revision: str | None
) -> None:
    missing = [name for name in required_files if not (folder / name).is_file()]
    if missing:
        present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        raise AdapterNotFoundError(
            f"{where} is missing required file(s) {missing}; files found: {present or 'none'}",
            location=location,
            revision=revision,
            missing=missing,
        )


def _adapter_files(names: Iterable[str]) -> list[str]:
    """The names that `ADAPTER_FILE_PATTERNS` admits, matched exactly as `huggingface_hub` matches them."""
    return list(filter_repo_objects(names, allow_patterns=list(ADAPTER_FILE_PATTERNS)))


def resolve_adapter_dir(
    dir_or_repo_id: str | Path,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    required_files: Sequence[str] = ("adapter_config.json",),
    local_files_only: bool = False,
) -> Path:
    """Return a local directory holding the adapter `dir_or_repo_id`, downloading it from the Hub if needed.

    An existing local directory is returned as is. Anything else is taken as a Hub repo id and fetched with
    `huggingface_hub.snapshot_download` into the Hub cache, restricted to `ADAPTER_FILE_PATTERNS` (never pickles
    or code). Either way, every file in `required_files` must be present.

    Args:
        dir_or_repo_id: local directory, or Hub repo id such as ``"user/my-video-adapter"``.
        revision: branch, tag or commit sha on the Hub (default: the default branch). Pin a commit sha to get
            exactly the files that were pushed then.
        token: Hub token; ``None`` uses the locally configured one, ``False`` sends none.
        cache_dir: Hub cache directory (default: ``HF_HUB_CACHE``).
        endpoint: Hub URL (default: ``HF_ENDPOINT`` or https://huggingface.co).
        required_files: repo-relative file names that must exist; each must match `ADAPTER_FILE_PATTERNS`.
        local_files_only: use the Hub cache only, with no network access.

    Raises:
        AdapterNotFoundError: no such local directory, repo, or revision; the repo is private/gated and the token
            does not grant access; the Hub cannot be reached and nothing is cached; or a required file is missing.
        ValueError: `revision` was given for a local directory, or a required file could never be downloaded.
    """
    location = str(dir_or_repo_id)
    local = Path(location).expanduser()
    if local.is_dir():
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} only applies to Hub repos, but {location!r} is a local directory"
            )
        _check_required(
            local, required_files, where=f"Local adapter directory '{location}'", location=location, revision=None
        )
        return local
    if isinstance(dir_or_repo_id, Path) or _looks_like_local_path(location) or local.exists():
        kind = "is not a directory" if local.exists() else "does not exist"
        raise AdapterNotFoundError(f"Local adapter path '{location}' {kind}", location=location)

    undownloadable = sorted(set(required_files) - set(_adapter_files(required_files)))
    if undownloadable:
        raise ValueError(
            f"required_files {undownloadable} can never be fetched from the Hub: only files matching "
            f"{list(ADAPTER_FILE_PATTERNS)} are downloaded"
        )

    shown_revision = revision or "main"
    where = f"Hub repo '{location}'" + (f" on {endpoint}" if endpoint else "")
    not_local = f" (and there is no local directory '{location}')"
    try:
        snapshot = snapshot_download(
            location,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            endpoint=endpoint,
            allow_patterns=list(ADAPTER_FILE_PATTERNS),
            local_files_only=local_files_only,
        )
    except HFValidationError as err:
        raise AdapterNotFoundError(
            f"'{location}' is neither an existing local directory nor a valid Hub repo id ({err})",
            location=location, revision=revision,
        ) from err
    except GatedRepoError as err:
        raise AdapterNotFoundError(
            f"{where} is gated and the token does not grant access{not_local}",
            location=location, revision=revision,
        ) from err
    except RepositoryNotFoundError as err:
        raise AdapterNotFoundError(
            f"{where} not found, or private and the token does not grant access{not_local}",
            location=location, revision=revision,
        ) from err
    except RevisionNotFoundError as err:
        raise AdapterNotFoundError(
            f"Revision '{shown_revision}' not found in {where}", location=location, revision=revision
        ) from err
    except LocalEntryNotFoundError as err:
        raise AdapterNotFoundError(
            f"Cannot fetch {where} at revision '{shown_revision}': the Hub is unreachable or offline mode is on, "
            f"and the local cache does not hold it{not_local}",
            location=location, revision=revision,
        ) from err
    except EntryNotFoundError as err:
        raise AdapterNotFoundError(
            f"A file of {where} at revision '{shown_revision}' could not be found: {err}",
            location=location, revision=revision,
        ) from err
    folder = Path(snapshot)
    _check_required(
        folder,
        required_files,
        where=f"{where} at revision '{shown_revision}' (downloading only {list(ADAPTER_FILE_PATTERNS)})",
        location=location,
        revision=revision,
    )
    return folder


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    delete_missing: bool = False,
) -> CommitInfo:
    """Upload the adapter files of `folder` to the Hub repo `repo_id` (created if needed) in one commit.

    Only files matching `ADAPTER_FILE_PATTERNS` are uploaded; others are skipped with a warning, since
    `resolve_adapter_dir` would never download them.

    Args:
        folder: local directory (e.g. written by ``save_pretrained``).
        repo_id: ``"namespace/name"`` of the model repo.
        private: visibility when the repo is created (ignored for an existing repo).
        commit_message: commit title (default: "Upload video2param adapter").
        token: Hub token with write access; ``None`` uses the locally configured one.
        endpoint: Hub URL (default: ``HF_ENDPOINT`` or https://huggingface.co).
        delete_missing: also delete remote files that are not in `folder` (except ``.gitattributes``), so the
            repo mirrors the folder, e.g. no stale weight shard from an earlier push survives.

    Returns:
        The commit: a `str` (the commit URL) whose ``.oid`` is the commit sha, usable as ``revision=`` to pin
        exactly this version. If nothing changed, the current head commit is returned and no commit is made.

    Raises:
        NotADirectoryError: `folder` is not a directory.
        ValueError: `folder` holds no adapter file.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise NotADirectoryError(f"push_folder: {str(folder)!r} is not a directory")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    files = list(filter_repo_objects(files, ignore_patterns=_BOOKKEEPING_PATTERNS))
    uploadable = _adapter_files(files)
    if not uploadable:
        raise ValueError(
            f"push_folder: {str(folder)!r} holds no adapter file matching {list(ADAPTER_FILE_PATTERNS)}"
            f" (found: {files or 'nothing'})"
        )
    skipped = sorted(set(files) - set(uploadable))
    if skipped:
        warnings.warn(
            f"push_folder: not uploading {skipped}: only {list(ADAPTER_FILE_PATTERNS)} are pushed and pulled",
            stacklevel=2,
        )
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message or "Upload video2param adapter",
        allow_patterns=list(ADAPTER_FILE_PATTERNS),
        delete_patterns=["*"] if delete_missing else None,
        repo_type="model",
    )
