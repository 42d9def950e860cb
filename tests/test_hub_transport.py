"""Hub transport (`video2param.hub`) against the loopback Hub: push, pull, pinning, safety, error messages."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError
from safetensors.numpy import save as save_safetensors

from hub_server import LoopbackHub, hub_server  # noqa: F401 - `hub_server` is a pytest fixture
from video2param.hub import (
    ADAPTER_FILE_PATTERNS,
    AdapterNotFoundError,
    push_folder,
    resolve_adapter_dir,
)

REPO = "test-user/video-adapter"


def write_adapter(folder: Path, *, rank: int = 4, seed: int = 0, extra: dict[str, bytes] | None = None) -> Path:
    """A realistic adapter folder: JSON config, safetensors weights, a model card."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"method": "vipe", "rank": rank, "seed": seed}))
    tensors = {"layers.0.q.A": rng.standard_normal((rank, 16)).astype(np.float32),
               "layers.0.q.B": rng.standard_normal((16, rank)).astype(np.float32)}
    (folder / "adapter_model.safetensors").write_bytes(save_safetensors(tensors))
    (folder / "README.md").write_text(f"---\nlibrary_name: video2param\n---\n# Adapter (seed {seed})\n")
    for name, data in (extra or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def read_tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- push / pull


def test_push_then_pull_gives_identical_bytes(hub_server: LoopbackHub, tmp_path: Path) -> None:
    local = write_adapter(tmp_path / "adapter", extra={"sub/extra_config.json": b'{"nested": true}'})
    commit = push_folder(local, REPO, endpoint=hub_server.endpoint, commit_message="first adapter")

    assert len(commit.oid) == 40 and commit.oid == hub_server.head(REPO)
    assert commit.startswith(f"{hub_server.endpoint}/{REPO}/commit/")
    assert HfApi(endpoint=hub_server.endpoint).model_info(REPO).sha == commit.oid

    cache = tmp_path / "empty_cache"
    pulled = resolve_adapter_dir(REPO, cache_dir=cache, endpoint=hub_server.endpoint)
    assert pulled.is_relative_to(cache)
    assert read_tree(pulled) == read_tree(local)  # .gitattributes of the repo is not an adapter file


def test_pinned_revision_returns_the_old_content(hub_server: LoopbackHub, tmp_path: Path) -> None:
    v1 = read_tree(write_adapter(tmp_path / "v1", rank=4, seed=1))
    first = push_folder(tmp_path / "v1", REPO, endpoint=hub_server.endpoint)
    write_adapter(tmp_path / "v2", rank=8, seed=2)
    second = push_folder(tmp_path / "v2", REPO, endpoint=hub_server.endpoint)
    assert first.oid != second.oid
    assert hub_server.history(REPO)[:2] == [second.oid, first.oid]

    cache = tmp_path / "cache"
    latest = resolve_adapter_dir(REPO, cache_dir=cache, endpoint=hub_server.endpoint)
    pinned = resolve_adapter_dir(REPO, revision=first.oid, cache_dir=cache, endpoint=hub_server.endpoint)
    assert read_tree(latest) == read_tree(tmp_path / "v2")
    assert read_tree(pinned) == v1
    assert json.loads((pinned / "adapter_config.json").read_text())["rank"] == 4


def test_unchanged_push_makes_no_new_commit(hub_server: LoopbackHub, tmp_path: Path) -> None:
    local = write_adapter(tmp_path / "adapter")
    first = push_folder(local, REPO, endpoint=hub_server.endpoint)
    again = push_folder(local, REPO, endpoint=hub_server.endpoint)
    assert again.oid == first.oid == hub_server.head(REPO)


def test_pickles_and_code_in_the_repo_are_never_downloaded(hub_server: LoopbackHub, tmp_path: Path) -> None:
    push_folder(write_adapter(tmp_path / "adapter"), REPO, endpoint=hub_server.endpoint)
    planted = {"adapter_model.bin": b"\x80\x04pickle", "modeling_evil.py": b"import os\n", "sub/state.pkl": b"\x80"}
    hub_server.commit_files(REPO, planted, message="plant unsafe files")

    pulled = resolve_adapter_dir(REPO, cache_dir=tmp_path / "cache", endpoint=hub_server.endpoint)
    names = set(read_tree(pulled))
    assert names == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    fetched = [r.path for r in hub_server.requests if "/resolve/" in r.path]
    assert fetched and not [p for p in fetched if p.endswith((".bin", ".py", ".pkl", ".gitattributes"))]


def test_tree_pagination_is_followed(hub_server: LoopbackHub, tmp_path: Path) -> None:
    hub_server.page_size = 2  # the client must follow the `Link: rel="next"` cursor pages
    extra = {f"shards/part_{i}.json": json.dumps({"i": i}).encode() for i in range(5)}
    local = write_adapter(tmp_path / "adapter", extra=extra)
    push_folder(local, REPO, endpoint=hub_server.endpoint)
    pulled = resolve_adapter_dir(REPO, cache_dir=tmp_path / "cache", endpoint=hub_server.endpoint)
    assert read_tree(pulled) == read_tree(local)


def test_private_repo_needs_a_token(hub_server: LoopbackHub, tmp_path: Path) -> None:
    push_folder(write_adapter(tmp_path / "adapter"), REPO, private=True, endpoint=hub_server.endpoint)
    assert hub_server.is_private(REPO)
    with pytest.raises(AdapterNotFoundError, match="not found, or private"):
        resolve_adapter_dir(REPO, token=False, cache_dir=tmp_path / "anon", endpoint=hub_server.endpoint)
    pulled = resolve_adapter_dir(REPO, token="hf_any", cache_dir=tmp_path / "auth", endpoint=hub_server.endpoint)
    assert (pulled / "adapter_model.safetensors").is_file()


def test_cached_adapter_is_found_offline(hub_server: LoopbackHub, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    push_folder(write_adapter(tmp_path / "adapter"), REPO, endpoint=hub_server.endpoint)
    online = resolve_adapter_dir(REPO, cache_dir=cache, endpoint=hub_server.endpoint)
    hub_server.stop()  # the Hub is gone: the cached snapshot must still resolve
    assert resolve_adapter_dir(REPO, cache_dir=cache, endpoint=hub_server.endpoint) == online
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_adapter_dir(REPO, cache_dir=cache, local_files_only=True) == online
    with pytest.raises(AdapterNotFoundError, match="unreachable or offline"):
        resolve_adapter_dir("test-user/never-downloaded", cache_dir=cache, endpoint=hub_server.endpoint)


def test_push_works_over_the_xet_upload_pipeline_too(hub_server: LoopbackHub, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("hf_xet")
    # With hf_xet installed (the default outside tests) `upload_folder` takes a pipelined path; the loopback Hub
    # answers "regular" for every file, so it must still end in a plain commit.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    local = write_adapter(tmp_path / "adapter")
    commit = push_folder(local, REPO, endpoint=hub_server.endpoint)
    assert commit.oid == hub_server.head(REPO)
    assert {k: v for k, v in hub_server.files(REPO).items() if k != ".gitattributes"} == read_tree(local)


# ---------------------------------------------------------------------------------------------- push options


def test_push_skips_non_adapter_files_with_a_warning(hub_server: LoopbackHub, tmp_path: Path) -> None:
    local = write_adapter(tmp_path / "adapter", extra={"optimizer.pt": b"\x80pickle", "train.py": b"print()\n"})
    (local / ".git").mkdir()
    (local / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    with pytest.warns(UserWarning, match=r"not uploading \['optimizer.pt', 'train.py'\]"):
        push_folder(local, REPO, endpoint=hub_server.endpoint)
    remote = hub_server.files(REPO)
    assert set(remote) == {".gitattributes", "adapter_config.json", "adapter_model.safetensors", "README.md"}


def test_delete_missing_mirrors_the_folder(hub_server: LoopbackHub, tmp_path: Path) -> None:
    local = write_adapter(tmp_path / "adapter", extra={"stale_shard.safetensors": b"old"})
    push_folder(local, REPO, endpoint=hub_server.endpoint)
    (local / "stale_shard.safetensors").unlink()

    push_folder(local, REPO, endpoint=hub_server.endpoint)  # default: remote files are kept
    assert "stale_shard.safetensors" in hub_server.files(REPO)
    (local / "README.md").write_text("# changed\n")
    push_folder(local, REPO, endpoint=hub_server.endpoint, delete_missing=True)
    remote = hub_server.files(REPO)
    assert "stale_shard.safetensors" not in remote and ".gitattributes" in remote
    assert remote["README.md"] == b"# changed\n"


def test_push_existing_repo_keeps_its_visibility(hub_server: LoopbackHub, tmp_path: Path) -> None:
    hub_server.create_repo(REPO, private=True)
    push_folder(write_adapter(tmp_path / "adapter"), REPO, private=False, endpoint=hub_server.endpoint)
    assert hub_server.is_private(REPO)


def test_push_rejects_bad_folders(hub_server: LoopbackHub, tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        push_folder(tmp_path / "missing", REPO, endpoint=hub_server.endpoint)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"\x80")
    with pytest.raises(ValueError, match="holds no adapter file"):
        push_folder(tmp_path / "junk", REPO, endpoint=hub_server.endpoint)
    assert not hub_server.repo_exists(REPO)  # nothing was created for a rejected folder


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("repo_id", ["test-user/no-such-adapter", "no-namespace-adapter"])
def test_missing_repo_raises_adapter_not_found(hub_server: LoopbackHub, tmp_path: Path, repo_id: str) -> None:
    with pytest.raises(AdapterNotFoundError, match=f"Hub repo '{repo_id}' on .* not found") as info:
        resolve_adapter_dir(repo_id, cache_dir=tmp_path, endpoint=hub_server.endpoint)
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.location == repo_id and info.value.missing == ()
    assert f"no local directory '{repo_id}'" in str(info.value)


@pytest.mark.parametrize("revision", ["no-such-branch", "0123456789abcdef0123456789abcdef01234567"])
def test_missing_revision_raises_adapter_not_found(hub_server: LoopbackHub, tmp_path: Path, revision: str) -> None:
    push_folder(write_adapter(tmp_path / "adapter"), REPO, endpoint=hub_server.endpoint)
    with pytest.raises(AdapterNotFoundError, match=f"Revision '{revision}' not found in Hub repo '{REPO}'") as info:
        resolve_adapter_dir(REPO, revision=revision, cache_dir=tmp_path / "cache", endpoint=hub_server.endpoint)
    assert info.value.revision == revision


def test_missing_required_file_raises_adapter_not_found(hub_server: LoopbackHub, tmp_path: Path) -> None:
    local = write_adapter(tmp_path / "adapter")
    (local / "adapter_config.json").unlink()
    commit = push_folder(local, REPO, endpoint=hub_server.endpoint)
    with pytest.raises(AdapterNotFoundError, match=r"missing required file\(s\) \['adapter_config.json'\]") as info:
        resolve_adapter_dir(REPO, revision=commit.oid, cache_dir=tmp_path / "cache", endpoint=hub_server.endpoint)
    assert commit.oid in str(info.value) and info.value.missing == ("adapter_config.json",)


def test_required_files_must_be_downloadable(hub_server: LoopbackHub, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\['adapter_model.bin'\] can never be fetched"):
        resolve_adapter_dir(REPO, required_files=("adapter_model.bin",), endpoint=hub_server.endpoint)
    assert not [r for r in hub_server.requests if REPO in r.path]  # rejected before any network call


def test_local_directories(tmp_path: Path) -> None:
    local = write_adapter(tmp_path / "adapter")
    assert resolve_adapter_dir(local) == local
    assert resolve_adapter_dir(str(local), required_files=("adapter_model.safetensors",)) == local
    with pytest.raises(AdapterNotFoundError, match=r"Local adapter directory .* \['weights.safetensors'\]"):
        resolve_adapter_dir(local, required_files=("weights.safetensors",))
    with pytest.raises(ValueError, match="only applies to Hub repos"):
        resolve_adapter_dir(local, revision="main")
    for missing in (tmp_path / "nope", "./nope", "some/deep/path"):
        with pytest.raises(AdapterNotFoundError, match="does not exist"):
            resolve_adapter_dir(missing)
    with pytest.raises(AdapterNotFoundError, match="is not a directory"):
        resolve_adapter_dir(local / "README.md")


def test_invalid_repo_id_is_reported_as_not_found(hub_server: LoopbackHub) -> None:
    with pytest.raises(AdapterNotFoundError, match="neither an existing local directory nor a valid Hub repo id"):
        resolve_adapter_dir("not a repo id", endpoint=hub_server.endpoint)


def test_adapter_patterns_are_safe_formats_only() -> None:
    assert set(ADAPTER_FILE_PATTERNS) == {"*.json", "*.safetensors", "README.md"}


# ---------------------------------------------------------------------------------------------- missing files


def test_missing_file_message_lists_the_top_level_only_and_is_short(tmp_path: Path) -> None:
    deep = tmp_path / "tree"
    for i in range(60):
        (deep / f"dir{i:02d}" / "a" / "b").mkdir(parents=True)
        (deep / f"dir{i:02d}" / "a" / "b" / "nested.json").write_text("{}")
    (deep / "top.txt").write_text("x")
    with pytest.raises(AdapterNotFoundError) as info:
        resolve_adapter_dir(deep, required_files=("adapter_config.json",))
    message = str(info.value)
    assert "nested.json" not in message and "'dir00/'" in message and "(+41 more)" in message
    assert len(message) < 600 and info.value.missing == ("adapter_config.json",)


# ---------------------------------------------------------------------------------------------- the loopback Hub


def test_loopback_hub_speaks_the_client_protocol(hub_server: LoopbackHub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub_server.endpoint)
    api.create_repo(REPO)
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(REPO)  # without exist_ok an existing repo is a 409
    assert conflict.value.response.status_code == 409
    with pytest.raises(HfHubHTTPError) as anonymous:
        api.upload_folder(repo_id=REPO, folder_path=write_adapter(tmp_path / "a"), token=False)
    assert anonymous.value.response.status_code == 401  # writes need a token

    api.upload_folder(repo_id=REPO, folder_path=write_adapter(tmp_path / "b", extra={"sub/x.json": b"{}"}))
    top = sorted((type(e).__name__, e.path) for e in api.list_repo_tree(REPO))
    assert ("RepoFolder", "sub") in top and ("RepoFile", "sub/x.json") not in top
    assert [e.path for e in api.list_repo_tree(REPO, path_in_repo="sub")] == ["sub/x.json"]
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "missing.json", cache_dir=tmp_path / "cache", endpoint=hub_server.endpoint)
    path = hf_hub_download(REPO, "sub/x.json", cache_dir=tmp_path / "cache", endpoint=hub_server.endpoint)
    assert Path(path).read_bytes() == b"{}"
    preuploads = [r.authorized for r in hub_server.requests if r.path == f"/api/models/{REPO}/preupload/main"]
    assert preuploads == [False, True]  # the anonymous attempt, then the default token from HF_TOKEN


def test_loopback_hub_listens_on_loopback_only_and_stops() -> None:
    with LoopbackHub() as hub:
        host, port = hub.endpoint.removeprefix("http://").split(":")
        assert host == "127.0.0.1"
        socket.create_connection((host, int(port)), timeout=2).close()
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=2)  # the socket is closed after stop()
    hub.stop()  # idempotent
    with pytest.raises(ValueError, match="page_size"):
        LoopbackHub(page_size=0)
