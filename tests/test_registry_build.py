"""The bundled registry is built from the facts file (checkpoints/sources.json) and says
what the facts say: pinned sizes and digests, mirrors with their revisions, the pages."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from beats import registry as reg

ROOT = Path(__file__).resolve().parents[1]
COPY = ROOT / "checkpoints" / "sources.json"
SHARED = ROOT.parent / "shared" / "data" / "checkpoint-sources.json"
FACTS = json.loads(COPY.read_text())


def _builder():
    spec = importlib.util.spec_from_file_location("build_registry",
                                                  ROOT / "checkpoints" / "build_registry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_registry_is_what_the_script_builds():
    builder = _builder()
    built = builder.render(builder.build(FACTS))
    assert (ROOT / "checkpoints" / "registry.json").read_text() == built
    done = subprocess.run([sys.executable, str(ROOT / "checkpoints" / "build_registry.py"),
                           "--check"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "up to date" in done.stdout


@pytest.mark.skipif(not SHARED.is_file(), reason="the facts file is beside CI's clone only")
def test_the_copy_is_the_facts_file_verbatim():
    assert COPY.read_bytes() == SHARED.read_bytes()


def test_pinned_digests_and_sizes_are_the_facts():
    entries = {e.name: e for e in reg.load_registry()}
    encoders = [f for f in FACTS["checkpoints"] if f["kind"] != "tokenizer"]
    assert len(encoders) == 15
    for fact in encoders:
        entry = entries[fact["name"]]
        assert (entry.size, entry.sha256) == (fact["size"], fact["sha256"]), fact["name"]
        assert entry.digest_sources == tuple(fact["digest_sources"]) and entry.digest_sources
    for fact in FACTS["checkpoints"]:
        entry = entries[fact["name"]]
        hub = [s for s in entry.sources if s.type == "huggingface"]
        assert [(s.repo_id, s.repo_type, s.filename, s.revision) for s in hub] == [
            (m["repo_id"], m["repo_type"], m["filename"], m["revision"]) for m in fact["mirrors"]]
        assert entry.browser_page == fact["official_browser_only"]
    assert len(entries) == len(FACTS["checkpoints"]) == 19


def test_default_models_download_from_mirrors():
    encoder = reg.default_model()
    assert encoder.name == "BEATs_iter3_plus_AS2M"
    assert len([s for s in encoder.scripted_sources if s.type == "huggingface"]) >= 2
    tagger = reg.find("as2m-cpt2")
    assert tagger.name == "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2"
    assert "THUdyh/Ola_speech_encoders" in [s.repo_id for s in tagger.scripted_sources]
    assert "`beats tag`" in tagger.description


def test_build_refuses_facts_that_disagree_with_the_table():
    builder = _builder()
    facts = json.loads(COPY.read_text())
    facts["checkpoints"].pop()
    with pytest.raises(ValueError, match="disagree on the names"):
        builder.build(facts)
