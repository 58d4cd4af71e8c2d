"""URL downloads against a local server: streaming, resume, restart, hashes, errors."""

from __future__ import annotations

import hashlib

import pytest

from beats.download import ChecksumError, DownloadError, download

from .servers import FileServer

DATA = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(DATA).hexdigest()


def test_download_streams_the_file_and_returns_its_sha256(tmp_path):
    with FileServer({"/f.pt": DATA}) as srv:
        digest = download(srv.url + "/f.pt?sig=secret", tmp_path / "f.pt")
    assert digest == SHA
    assert (tmp_path / "f.pt").read_bytes() == DATA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.pt"]  # no .part left


def test_connection_cut_mid_file_resumes_with_range(tmp_path):
    with FileServer({"/f.pt": DATA}, cuts=1) as srv:
        digest = download(srv.url + "/f.pt", tmp_path / "f.pt", sha256=SHA, size=len(DATA))
        gets = srv.gets("/f.pt")
    assert digest == SHA and (tmp_path / "f.pt").read_bytes() == DATA
    assert len(gets) == 2
    assert "Range" not in gets[0].headers
    assert gets[1].headers["Range"] == f"bytes={len(DATA) // 2}-"


def test_connection_cut_restarts_when_the_server_cannot_resume(tmp_path):
    with FileServer({"/f.pt": DATA}, cuts=1, ranges=False) as srv:
        digest = download(srv.url + "/f.pt", tmp_path / "f.pt", sha256=SHA)
        gets = srv.gets("/f.pt")
    assert digest == SHA and (tmp_path / "f.pt").read_bytes() == DATA
    assert len(gets) == 2 and gets[1].headers["Range"] == f"bytes={len(DATA) // 2}-"


def test_part_file_left_by_an_earlier_run_is_resumed(tmp_path):
    (tmp_path / "f.pt.part").write_bytes(DATA[:1000])
    with FileServer({"/f.pt": DATA}) as srv:
        digest = download(srv.url + "/f.pt", tmp_path / "f.pt")
        gets = srv.gets("/f.pt")
    assert digest == SHA and (tmp_path / "f.pt").read_bytes() == DATA
    assert [g.headers.get("Range") for g in gets] == ["bytes=1000-"]


def test_stale_part_longer_than_the_file_is_discarded(tmp_path):
    (tmp_path / "f.pt.part").write_bytes(DATA + b"junk")
    with FileServer({"/f.pt": DATA}) as srv:
        assert download(srv.url + "/f.pt", tmp_path / "f.pt", size=len(DATA)) == SHA
        assert "Range" not in srv.gets("/f.pt")[0].headers


def test_wrong_sha256_deletes_the_file_and_names_both_hashes(tmp_path):
    wrong = "0" * 64
    with FileServer({"/f.pt": DATA}) as srv, pytest.raises(ChecksumError) as err:
        download(srv.url + "/f.pt", tmp_path / "f.pt", sha256=wrong)
    text = str(err.value)
    assert f"expected {wrong}" in text and f"got {SHA}" in text
    assert "deleted" in text
    assert list(tmp_path.iterdir()) == []


def test_wrong_size_deletes_the_file(tmp_path):
    with FileServer({"/f.pt": DATA}) as srv, pytest.raises(DownloadError) as err:
        download(srv.url + "/f.pt", tmp_path / "f.pt", size=len(DATA) + 1)
    assert f"gave {len(DATA)} bytes where {len(DATA) + 1} were expected" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_http_error_is_reported_without_the_query_string(tmp_path):
    with FileServer({}) as srv, pytest.raises(DownloadError) as err:
        download(srv.url + "/missing.pt?sig=secret", tmp_path / "f.pt")
    assert str(err.value) == f"{srv.url}/missing.pt answered HTTP 404 Not Found"
    assert len(srv.requests) == 1  # a 404 is not retried


def test_unreachable_server_gives_up_after_the_retries(tmp_path):
    srv = FileServer({})
    url = srv.url + "/f.pt"
    srv.close()  # nothing listens on that port any more
    with pytest.raises(DownloadError) as err:
        download(url, tmp_path / "f.pt", retries=2, timeout=5)
    assert "failed 3 times in a row" in str(err.value) and "cannot connect" in str(err.value)
    assert not (tmp_path / "f.pt").exists()


def test_progress_bar(tmp_path, capsys):
    with FileServer({"/f.pt": DATA}) as srv:
        download(srv.url + "/f.pt", tmp_path / "f.pt", progress=True, desc="my-model")
    err = capsys.readouterr().err
    assert "my-model" in err and "1.00M" in err
