"""Hub transport for adapter folders: safe download and push.

Model-agnostic: this module moves *folders* of adapter files (JSON configs, safetensors weights, a README) between
disk and the Hugging Face Hub. What the files mean is the business of `video2param.model`.

Safety rule: only ``*.json``, ``*.safetensors`` and ``README.md`` are ever downloaded or pushed
(`ADAPTER_FILE_PATTERNS`); pickles (``.bin``, ``.pt``, ``.pkl``), code (``.py``) and anything else in a repo are
left on the Hub, so loading an adapter can never execute or unpickle remote content.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterable, Sequence
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
    "push_folder",
    "resolve_adapter_dir",
]

#: The only files moved to or from the Hub (fnmatch patterns on repo-relative paths; ``*`` spans folders).
ADAPTER_FILE_PATTERNS: tuple[str, ...] = ("*.json", "*.safetensors", "README.md")

# A "missing file" error lists what the folder holds: its top level only, and at most this many names, so pointing
# the loader at a system directory gives a short message at once.
_LISTED_FILES = 20
_SCANNED_ENTRIES = 1000

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
        raise AdapterNotFoundError(
            f"{where} is missing required file(s) {missing}; it holds: {_top_level_listing(folder)}",
            location=location,
            revision=revision,
            missing=missing,
        )


def _top_level_listing(folder: Path) -> str:
    """A short, sorted list of the folder's top-level entries (folders end in ``/``); never recursive."""
    try:
        with os.scandir(folder) as entries:
            scanned = list(itertools.islice(entries, _SCANNED_ENTRIES + 1))
    except OSError as err:
        return f"(cannot list it: {err.strerror or err})"
    if not scanned:
        return "nothing"
    names = sorted(e.name + ("/" if e.is_dir(follow_symlinks=False) else "") for e in scanned[:_SCANNED_ENTRIES])
    more = len(scanned) > _SCANNED_ENTRIES
    shown = ", ".join(repr(n) for n in names[:_LISTED_FILES])
    if more:
        shown += f", ... ({_SCANNED_ENTRIES}+ entries)"
    elif len(names) > _LISTED_FILES:
        shown += f", ... (+{len(names) - _LISTED_FILES} more)"
    return "[" + shown + "]"


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
