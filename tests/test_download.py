"""URL downloads against a local server: streaming, resume, restart, hashes, errors, probes."""

from __future__ import annotations

import hashlib

import pytest

from beats.download import ChecksumError, DownloadError, check_file, download, probe_url

from .servers import AZURE_403, HTML_PAGE, FileServer

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


def test_wrong_size_is_refused_before_the_body_is_read(tmp_path):
    with FileServer({"/f.pt": DATA}) as srv, pytest.raises(DownloadError) as err:
        download(srv.url + "/f.pt", tmp_path / "f.pt", size=len(DATA) + 1)
    assert err.value.cause == (f"wrong size: the server announces {len(DATA)} bytes, the "
                               f"registry pins {len(DATA) + 1}")
    assert list(tmp_path.iterdir()) == []


def test_wrong_size_announced_on_resume_deletes_the_part(tmp_path):
    (tmp_path / "f.pt.part").write_bytes(DATA[:1000])  # resumed: the total is in Content-Range
    with FileServer({"/f.pt": DATA[:5000]}) as srv, pytest.raises(DownloadError) as err:
        download(srv.url + "/f.pt", tmp_path / "f.pt", size=6000)
    assert err.value.cause == "wrong size: the server announces 5000 bytes, the registry pins 6000"
    assert list(tmp_path.iterdir()) == []


def test_azure_403_names_its_error_code_and_is_not_retried(tmp_path):
    with FileServer({}, pages={"/share/f.pt": AZURE_403}) as srv, \
            pytest.raises(DownloadError) as err:
        download(srv.url + "/share/f.pt?sv=2020&sig=secret", tmp_path / "f.pt")
    assert err.value.cause == "HTTP 403 AuthenticationFailed"
    assert str(err.value) == f"{srv.url}/share/f.pt answered HTTP 403 AuthenticationFailed"
    assert len(srv.requests) == 1
    assert list(tmp_path.iterdir()) == []


def test_azure_error_code_is_read_from_the_xml_body(tmp_path):
    page = AZURE_403.__class__(403, AZURE_403.body, "application/xml")  # no x-ms header
    with FileServer({}, pages={"/f.pt": page}) as srv, pytest.raises(DownloadError) as err:
        download(srv.url + "/f.pt", tmp_path / "f.pt")
    assert err.value.cause == "HTTP 403 AuthenticationFailed"


def test_html_page_is_refused_without_reading_it(tmp_path):
    with FileServer({}, pages={"/f.pt": HTML_PAGE}) as srv, pytest.raises(DownloadError) as err:
        download(srv.url + "/f.pt", tmp_path / "f.pt", sha256=SHA)
    assert err.value.cause == "an HTML page (text/html), not a checkpoint"
    assert list(tmp_path.iterdir()) == []


def test_connection_cut_at_the_same_place_gives_up(tmp_path):
    with FileServer({"/f.pt": DATA}, cut_at=1000) as srv:
        with pytest.raises(DownloadError) as err:
            download(srv.url + "/f.pt", tmp_path / "f.pt", retries=1)
        ranges = [g.headers.get("Range") for g in srv.gets("/f.pt")]
    assert ranges == [None, "bytes=1000-"]  # the second brought nothing: no more retries
    assert err.value.cause == f"connection cut after 1000 of {len(DATA)} bytes"
    assert "failed 2 times in a row" in str(err.value)


def test_stalled_server_times_out(tmp_path):
    with FileServer({"/f.pt": DATA}, stall=3) as srv, pytest.raises(DownloadError) as err:
        download(srv.url + "/f.pt", tmp_path / "f.pt", retries=0, timeout=0.3)
    assert err.value.cause == "timed out after 0.3 s, 0 bytes in"


def test_check_file_names_html_then_size_then_digest(tmp_path):
    f = tmp_path / "f.pt"
    f.write_bytes(HTML_PAGE.body)
    assert check_file(f, 10, "0" * 64) == "an HTML page, not a checkpoint"
    f.write_bytes(DATA[:10])
    assert check_file(f, 11, None) == "wrong size: 10 bytes, the registry pins 11"
    sha10 = hashlib.sha256(DATA[:10]).hexdigest()
    zeros = "0" * 64
    assert check_file(f, 10, zeros) == f"sha256 mismatch: got {sha10}, the registry pins {zeros}"
    assert check_file(f, 10, sha10) is None and check_file(f, None, None) is None


def test_probe_asks_for_one_byte(tmp_path):
    pages = {"/azure.pt": AZURE_403, "/page.pt": HTML_PAGE}
    with FileServer({"/f.pt": DATA}, pages=pages) as srv:
        good = probe_url(srv.url + "/f.pt", size=len(DATA))
        wrong = probe_url(srv.url + "/f.pt", size=5)
        azure = probe_url(srv.url + "/azure.pt")
        html = probe_url(srv.url + "/page.pt")
        missing = probe_url(srv.url + "/nope.pt")
        ranges = {r.headers.get("Range") for r in srv.requests}
    assert (good.ok, good.text, good.size) == (True, f"HTTP 206, {len(DATA)} bytes", len(DATA))
    assert (wrong.ok, wrong.text) == (False, f"HTTP 206, {len(DATA)} bytes: wrong size, the "
                                             "registry pins 5")
    assert (azure.ok, azure.text) == (False, "HTTP 403 AuthenticationFailed")
    assert (html.ok, html.text) == (False, "an HTML page (text/html), not a checkpoint")
    assert (missing.ok, missing.text) == (False, "HTTP 404 Not Found")
    assert ranges == {"bytes=0-0"}


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
    assert err.value.cause.startswith("cannot connect: [Errno 111]")
    assert not (tmp_path / "f.pt").exists()


def test_progress_bar(tmp_path, capsys):
    with FileServer({"/f.pt": DATA}) as srv:
        download(srv.url + "/f.pt", tmp_path / "f.pt", progress=True, desc="my-model")
    err = capsys.readouterr().err
    assert "my-model" in err and "1.00M" in err
