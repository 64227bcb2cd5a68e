import gzip
import urllib.error
import urllib.request

import pytest
from PIL import Image

from webpairs.testweb import serve_test_web


def _get(url, timeout=5.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers


def test_serves_every_planted_case_and_stops(tmp_path):
    with serve_test_web(str(tmp_path), slow_delay=0.5) as web:  # generated photos: no shared data
        assert web.base_url.startswith("http://127.0.0.1:")
        for url in list(web.good)[:5] + web.boilerplate:
            status, body, _ = _get(url)
            assert status == 200 and Image.open(__import__("io").BytesIO(body)).size[0] > 1
        for url, (stage, reason) in web.bad.items():
            if stage == "extract":
                continue  # never served: the crawler must refuse these links
            route = web.routes[url[len(web.base_url):]]
            if reason == "redirect_refused":  # check the 302 without following it
                import http.client

                conn = http.client.HTTPConnection("127.0.0.1", int(web.base_url.rsplit(":", 1)[1]), timeout=5)
                conn.request("GET", url[len(web.base_url):])
                resp = conn.getresponse()
                assert resp.status == 302 and "169.254.169.254" in resp.getheader("Location")
                conn.close()
                continue
            status, body, headers = _get(url)
            if reason.startswith("http_"):
                assert status == int(reason[5:])
            else:
                assert status == 200 and body == route.body
            if reason == "opt_out":
                assert headers["X-Robots-Tag"] == "noai"
        status, body, _ = _get(web.url("/go/redirect.jpg"))
        assert status == 200 and body == web.routes["/img/t1/target.jpg"].body
        with pytest.raises(Exception):  # the slow case really is slower than a short timeout
            urllib.request.urlopen(web.url("/bad/slow.jpg"), timeout=0.1).read()
        with gzip.open(web.warc_path, "rb") as fh:
            warc = fh.read()
        assert warc.count(b"WARC-Type: response") == len(web.pages) == 12
        port_url = web.base_url
    with pytest.raises(OSError):
        urllib.request.urlopen(port_url + "/static/logo.png", timeout=1)


def test_real_photos_topics(test_web, photos_dir):
    assert len(set(test_web.pages.values())) == 6
    assert len(test_web.near_duplicate_groups[0]) == 5
    status, body, _ = _get(next(iter(test_web.good)))
    assert status == 200 and body[:2] == b"\xff\xd8"


def test_generated_photos_keep_their_structure_at_the_training_size():
    """The demo trains at 32 px: a generated topic's motif must still be a shape there (bands vary
    down the rows, bars across the columns), and two photos of a topic must differ in layout and
    stay apart for the pair stage (pHash over its near-duplicate distance of 10)."""
    import imagehash
    import numpy as np

    from webpairs.testweb import generated_photo

    def profile(topic, index):
        grey = np.asarray(generated_photo(topic, index).resize((32, 32), Image.BILINEAR).convert("L"), dtype=float)
        return grey.mean(axis=1).std(), grey.mean(axis=0).std()  # spread of row means, of column means

    for index in range(6):
        rows, cols = profile(1, index)  # motif 1: horizontal bands
        assert rows > 2 * cols and rows > 15, (index, rows, cols)
        rows, cols = profile(2, index)  # motif 2: slanted vertical bars
        assert cols > rows and cols > 10, (index, rows, cols)
    for topic in range(6):
        hashes = [imagehash.phash(generated_photo(topic, i)) for i in range(8)]
        assert min(a - b for i, a in enumerate(hashes) for b in hashes[i + 1 :]) > 10, topic
    for size in ((64, 64), (20, 20), (1000, 300)):  # any size the tests ask for
        assert generated_photo(3, 1, size).size == size
