"""fetch_image against a loopback server that misbehaves on purpose, plus file:// and plain paths."""
import io
import time

import pytest
from PIL import Image

from fakes import EXPECTED_REASONS, Fault, ImageServer, scene_jpegs, standard_faults

from llava_lib.data import FetchError, fetch_image
from llava_lib.data.fetch import decode_image

pytestmark = pytest.mark.timeout(60)
MAX_BYTES = 200_000
OPTS = dict(timeout=0.5, max_bytes=MAX_BYTES, retries=2, backoff=0.02)


@pytest.fixture(scope="module")
def jpegs():
    return scene_jpegs(4, seed=1)


@pytest.fixture
def server(jpegs):
    files = {"/ok.jpg": jpegs[0], "/fault/flaky.jpg": jpegs[1]}
    with ImageServer(files, standard_faults(jpegs[2], MAX_BYTES)) as srv:
        yield srv


def test_good_image_arrives_as_rgb(server, jpegs):
    img = fetch_image(server.url("/ok.jpg"), **OPTS)
    assert img.mode == "RGB" and img.size == (224, 224)
    assert img.tobytes() == Image.open(io.BytesIO(jpegs[0])).convert("RGB").tobytes()


def test_500_twice_then_200_is_retried(server):
    img = fetch_image(server.url("/fault/flaky.jpg"), **OPTS)
    assert img.size == (224, 224)
    assert server.hits["/fault/flaky.jpg"] == 3


@pytest.mark.parametrize("path", sorted(EXPECTED_REASONS))
def test_each_fault_has_its_reason(server, path):
    t0 = time.monotonic()
    with pytest.raises(FetchError) as e:
        fetch_image(server.url(path), **OPTS)
    assert e.value.reason == EXPECTED_REASONS[path], e.value.message
    assert server.url(path) in e.value.message  # the message names the thing
    assert time.monotonic() - t0 < 10  # nothing hangs: stalls end at the timeout (x retries)


def test_404_not_retried_5xx_and_stall_retried(server):
    for path, transient in [("/fault/404.jpg", False), ("/fault/503.jpg", True), ("/fault/stall.jpg", True)]:
        with pytest.raises(FetchError) as e:
            fetch_image(server.url(path), **OPTS)
        assert e.value.transient is transient
    assert server.hits["/fault/404.jpg"] == 1
    assert server.hits["/fault/503.jpg"] == 3 and server.hits["/fault/stall.jpg"] == 3


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_then_200(jpegs, status):
    """Two answers with Retry-After: 1, then the image. The header sets the wait: without it the second retry would
    wait the 30 s backoff (the test would time out), with it the whole fetch takes about 2 s."""
    fault = Fault("flaky", status=status, times=2, retry_after=1)
    with ImageServer({"/r.jpg": jpegs[0]}, {"/r.jpg": fault}) as srv:
        t0 = time.monotonic()
        assert fetch_image(srv.url("/r.jpg"), **{**OPTS, "backoff": 30}).size == (224, 224)
        elapsed = time.monotonic() - t0
    assert srv.hits["/r.jpg"] == 3
    assert 1.8 <= elapsed < 10, elapsed


def test_a_long_retry_after_is_capped():
    from llava_lib.data.fetch import MAX_RETRY_AFTER, _session

    assert _session().get_adapter("http://x").max_retries.parse_retry_after("3600") == MAX_RETRY_AFTER == 30


def test_403_is_an_expired_link_not_retried_now_but_later(server):
    from llava_lib.data.fetch import REFRESH_LINKS_CMD, reason_label

    url = server.url("/fault/403.jpg")
    with pytest.raises(FetchError) as e:
        fetch_image(url, **OPTS)
    assert e.value.reason == "http_403" and e.value.transient  # a rerun with fresh links may succeed
    assert url in e.value.message and "过期" in e.value.message and REFRESH_LINKS_CMD in e.value.message
    assert server.hits["/fault/403.jpg"] == 1  # retrying an expired link at once cannot help
    assert "过期" in reason_label("http_403")


def test_connection_refused_is_transient():
    with ImageServer() as srv:
        url = srv.url("/gone.jpg")
    with pytest.raises(FetchError) as e:
        fetch_image(url, timeout=0.5, retries=0)
    assert e.value.reason == "connection" and e.value.transient


def test_file_url_plain_path_and_rewrite(tmp_path, jpegs):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "000001.jpg").write_bytes(jpegs[0])
    p = tmp_path / "train" / "000001.jpg"
    assert fetch_image(str(p)).size == (224, 224)
    assert fetch_image(p.as_uri()).size == (224, 224)
    rewrite = ("http://127.0.0.1:18765/", str(tmp_path) + "/")
    assert fetch_image("http://127.0.0.1:18765/train/000001.jpg", url_rewrite=rewrite).size == (224, 224)
    with pytest.raises(FetchError) as e:
        fetch_image(str(tmp_path / "missing.jpg"))
    assert e.value.reason == "not_found" and not e.value.transient
    with pytest.raises(FetchError) as e:
        fetch_image(str(p), max_bytes=100)
    assert e.value.reason == "too_large"
    with pytest.raises(FetchError) as e:
        fetch_image("ftp://example.invalid/x.jpg")
    assert e.value.reason == "bad_url"


def test_exif_orientation_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert decode_image(buf.getvalue()).size == (20, 40)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bomb_between_warning_and_error_threshold_is_rejected(monkeypatch):
    """Pillow only warns between MAX_IMAGE_PIXELS and twice that; we treat the warning as a failure too."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    buf = io.BytesIO()
    Image.new("L", (40, 40)).save(buf, format="PNG")  # 1600 pixels: > 1000, < 2000
    with pytest.raises(FetchError) as e:
        decode_image(buf.getvalue(), "x.png")
    assert e.value.reason == "decompression_bomb"


def test_fetch_error_pickles():
    import pickle

    e = pickle.loads(pickle.dumps(FetchError("http_404", "HTTP 404：u", "u", False)))
    assert (e.reason, e.message, e.url, e.transient) == ("http_404", "HTTP 404：u", "u", False)
