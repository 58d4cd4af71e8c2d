"""Hugging Face Hub repos, through the real huggingface_hub client and a local hub server.

The session's hub server (conftest.HUB) is huggingface_hub's endpoint (HF_ENDPOINT).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from beats import BEATs

from .conftest import HUB, REFERENCE, reference_model
from .test_save_load import assert_same_model

ROOT = Path(__file__).resolve().parents[1]
_IDS = itertools.count()


def _repo() -> str:
    """A fresh repo id (the hub server lives for the whole session)."""
    return f"tester/model-{os.getpid()}-{next(_IDS)}"


def publish(repo_id: str, model: BEATs, tmp_path: Path, branch: str = "main") -> str:
    """Commit ``model``'s save_pretrained files to the hub server; return the commit id."""
    folder = model.save_pretrained(tmp_path / f"publish-{next(_IDS)}")
    return HUB.commit(repo_id, {p.name: p.read_bytes() for p in folder.iterdir()}, branch)


def _gets(repo_id: str) -> list[str]:
    return [r.path.rsplit("/", 1)[-1] for r in HUB.hub_requests(repo_id) if r.method == "GET"]


def test_hub_repo_loads_bit_identically_and_uses_the_cache(tmp_path, waves):
    repo = _repo()
    sha = publish(repo, reference_model("finetuned"), tmp_path)
    cache = tmp_path / "hf-cache"
    model = BEATs.from_pretrained(repo, cache_dir=cache)
    assert_same_model(reference_model("finetuned"), model, waves["wav.1"])
    assert sorted(_gets(repo)) == ["config.json", "labels.json", "model.safetensors"]
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / sha
    assert sorted(p.name for p in snapshot.iterdir()) == [
        "config.json", "labels.json", "model.safetensors"
    ]
    BEATs.from_pretrained(repo, cache_dir=cache)  # cached: metadata checks only
    assert len(_gets(repo)) == 3


def test_default_hub_cache_is_huggingface_hubs(tmp_path):
    repo = _repo()
    publish(repo, reference_model("postnorm_gru"), tmp_path)
    BEATs.from_pretrained(repo)
    folder = Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo.replace('/', '--')}"
    assert len(list(folder.glob("snapshots/*/model.safetensors"))) == 1


def test_revision_selects_a_branch_or_commit(tmp_path, waves):
    repo = _repo()
    old = publish(repo, reference_model("postnorm_gru"), tmp_path)
    HUB.repos[repo].refs["v1"] = old
    publish(repo, reference_model("relpos_relu"), tmp_path)
    cache = tmp_path / "c"
    wav = waves["wav.0"]
    latest = BEATs.from_pretrained(repo, cache_dir=cache)
    assert_same_model(reference_model("relpos_relu"), latest, wav)
    for revision in ("v1", old):
        loaded = BEATs.from_pretrained(repo, revision=revision, cache_dir=cache)
        assert_same_model(reference_model("postnorm_gru"), loaded, wav)


def test_unknown_revision(tmp_path):
    repo = _repo()
    publish(repo, reference_model("postnorm_gru"), tmp_path)
    with pytest.raises(ValueError, match=f"the Hub repo {repo} has no revision 'nope'"):
        BEATs.from_pretrained(repo, revision="nope", cache_dir=tmp_path)


def test_unknown_repo(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        BEATs.from_pretrained("nobody/BEATs_iter3_plus_AS2", cache_dir=tmp_path)
    text = str(err.value)
    assert "'nobody/BEATs_iter3_plus_AS2' is not a local path or a registered model name" in text
    assert f"the Hugging Face Hub ({HUB.url}) has no repo by that id" in text
    assert "Registered names like it: BEATs_iter3_plus_AS2M" in text


def test_repo_without_the_beats_format_points_to_convert(tmp_path):
    repo = _repo()
    HUB.commit(repo, {"BEATs_iter3.pt": (REFERENCE / "postnorm_gru.pt").read_bytes()})
    with pytest.raises(FileNotFoundError) as err:
        BEATs.from_pretrained(repo, cache_dir=tmp_path)
    assert f"the Hub repo {repo} has no config.json, so it is not in the beats format" in str(
        err.value)
    assert "beats convert FILE DIR" in str(err.value)
    assert "BEATs_iter3.pt" not in _gets(repo)  # no pickle was fetched


def test_offline_with_a_warm_hub_cache(tmp_path, monkeypatch, waves):
    repo = _repo()
    publish(repo, reference_model("finetuned"), tmp_path)
    cache = tmp_path / "c"
    online = BEATs.from_pretrained(repo, cache_dir=cache)
    seen = len(HUB.hub_requests(repo))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_same_model(online, BEATs.from_pretrained(repo, cache_dir=cache), waves["wav.0"])
    monkeypatch.delenv("HF_HUB_OFFLINE")
    offline = BEATs.from_pretrained(repo, cache_dir=cache, local_files_only=True)
    assert_same_model(online, offline, waves["wav.0"])
    assert len(HUB.hub_requests(repo)) == seen  # not one request


def test_offline_with_a_cold_hub_cache_says_what_is_missing(tmp_path, monkeypatch):
    repo = _repo()
    publish(repo, reference_model("postnorm_gru"), tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        BEATs.from_pretrained(repo, cache_dir=tmp_path / "c")
    assert str(err.value) == (
        f"config.json of the Hub repo {repo} is not in the Hugging Face cache "
        f"({tmp_path / 'c'}) and downloads are off (HF_HUB_OFFLINE is set). Load it once "
        "with network access to cache it"
    )
    assert HUB.hub_requests(repo) == []


def test_hf_hub_offline_set_before_import(tmp_path):
    """The client's own offline mode (HF_HUB_OFFLINE read at import) in a fresh process."""
    repo = _repo()
    publish(repo, reference_model("postnorm_gru"), tmp_path)
    warm, cold = tmp_path / "warm", tmp_path / "cold"
    BEATs.from_pretrained(repo, cache_dir=warm)
    seen = len(HUB.hub_requests(repo))
    code = (
        "import sys\n"
        "from beats import BEATs\n"
        "print(BEATs.from_pretrained(sys.argv[1], cache_dir=sys.argv[2]).cfg.encoder_layers)\n"
        "try:\n"
        "    BEATs.from_pretrained(sys.argv[1], cache_dir=sys.argv[3])\n"
        "except FileNotFoundError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, repo, str(warm), str(cold)], capture_output=True,
        text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    warm_line, cold_line = done.stdout.strip().splitlines()
    assert warm_line == "3"
    assert cold_line.startswith(
        f"config.json of the Hub repo {repo} is not in the Hugging Face cache ({cold})")
    assert len(HUB.hub_requests(repo)) == seen


def test_push_to_hub_round_trip(tmp_path, waves):
    repo = _repo()
    model = reference_model("finetuned")
    url = model.push_to_hub(repo, token="hf_test_token")
    sha = HUB.repos[repo].refs["main"]
    assert url == f"{HUB.url}/{repo}/commit/{sha}"
    assert sorted(HUB.repos[repo].commits[sha]) == [
        "config.json", "labels.json", "model.safetensors"
    ]
    posts = [r for r in HUB.requests if r.method == "POST" and repo in r.path]
    assert [p.path.split("/")[-2] for p in posts] == ["preupload", "commit"]
    assert all(p.headers["authorization"] == "Bearer hf_test_token" for p in posts)
    assert_same_model(model, BEATs.from_pretrained(repo, cache_dir=tmp_path), waves["wav.2"])
