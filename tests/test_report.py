"""``fastsal report`` over real stores on disk (made by ``fastsal run`` on generated photos, and a
10,000-image store written directly with zarr), opened in a real headless Chromium through Selenium:
every picture loads, sorting and filtering change the rows shown, the maps' colours are the colour
table's at the map's values. Screenshots go to the test's folder and to out/report-screens/."""

from __future__ import annotations

import base64
import json
import shutil
import time
import warnings
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import zarr
from matplotlib import colormaps
from PIL import Image

from fastsal import cli, jobs, report
from fastsal._export import signed_maps
from fastsal.report import ReportError, quantise, shrink, write_report

SCREENS = Path(__file__).resolve().parents[1] / "out" / "report-screens"
LABELS = [f"n0{1440764 + i:07d} thing{i}, alias {i}" for i in range(5)]  # Caffe's synset_words.txt lines


def photo(rng, h, w):
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / (4 + 2 * c) + c) + np.cos(y / (6 + c)) for c in range(3)], axis=2)
    return np.clip(127 + 60 * base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def stores(model, tmp_path_factory):
    """Two real stores of one image list (saliency, and integrated gradients summed over channels: signed
    maps), with overlays; one gets a metric by hand, as an evaluation adds it, the other loses its
    probabilities, as stores made before fastsal wrote them."""
    folder = tmp_path_factory.mktemp("report")
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(8)
    for i in range(7):  # one name a link must escape
        name = "photo 6 #1%.png" if i == 6 else f"photo{i}.png"
        Image.fromarray(photo(rng, 36 + 4 * i, 48 - 2 * i)).save(images / name)
    (images / "broken.jpg").write_bytes(b"not a picture")
    prototxt, weights = model
    made = {}
    for method, extra in (("saliency", []), ("integrated_gradients", ["--reduce", "sum", "--n-steps", "8"])):
        out, overlays = folder / f"{method}.zarr", folder / f"overlays-{method}"
        code = cli.main(
            ["run", str(images), "--model-def", prototxt, "--pretrained-model", weights, "-o", str(out)]
            + [
                "--top-k",
                "2",
                "--chunk-size",
                "3",
                "--method",
                method,
                "--overlays",
                str(overlays),
                "--quiet",
            ]
            + extra
        )
        assert code == 1  # broken.jpg failed
        made[method] = (out, overlays)
    group = zarr.open_group(str(made["saliency"][0]), mode="r+")
    assert "probabilities" in group  # fastsal run writes them beside the scores
    del zarr.open_group(str(made["integrated_gradients"][0]), mode="r+")["probabilities"]  # as older stores
    deletion = rng.uniform(0, 1, group["classes"].shape).astype(np.float32)
    deletion[group["status"][:] != jobs.OK] = np.nan  # an evaluation has nothing to say of a failed image
    group.create_array("metrics/deletion", data=deletion)
    # fastsal evaluate writes each metric's curves beside it (and MPRT its per-step values): not columns
    group.create_array("metrics/deletion_curve", data=np.repeat(deletion[..., None], 5, axis=2))
    group.create_array("metrics/mprt_spearman", data=np.repeat(deletion[..., None], 2, axis=2))
    labels = folder / "synset_words.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    return made, labels, folder


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser tests need selenium")
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("the browser tests need Debian's chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    yield chrome
    chrome.quit()


def open_page(browser, path: Path, timeout: float = 30.0) -> float:
    """Loads a report page from disk; the seconds until its script has painted the maps and rows."""
    start = time.perf_counter()
    browser.get(path.as_uri())
    while browser.execute_script("return document.body && document.body.dataset.ready") != "1":
        if time.perf_counter() - start > timeout:
            raise AssertionError(f"{path.name} did not render within {timeout} s")
        time.sleep(0.05)
    return time.perf_counter() - start


def screenshot(browser, tmp_path: Path, name: str) -> None:
    browser.save_screenshot(str(tmp_path / name))
    SCREENS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp_path / name, SCREENS / name)


def visible_ids(browser) -> list[int]:
    return browser.execute_script(
        "return Array.from(document.querySelector('[data-rows]').children)"
        ".filter(r => !r.hidden).map(r => Number(r.dataset.index))"
    )


def set_control(browser, name: str, value: str) -> None:
    """Sets a control as a user would, and fires the event the page listens to."""
    browser.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event(e.tagName === 'SELECT' ? 'change' : 'input'));",
        name,
        value,
    )


def load_all_images(browser) -> list[dict]:
    """Scrolls each <img> into view (they load lazily) and waits for it: its src and naturalWidth."""
    return browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; const out = [];"
        "(async () => { for (const img of document.querySelectorAll('img')) {"
        "  img.scrollIntoView(); try { await img.decode(); } catch (e) {}"
        "  out.push({src: img.getAttribute('src'), width: img.naturalWidth}); } done(out); })();"
    )


def test_report_in_chromium(stores, browser, tmp_path):
    made, labels, _ = stores
    (sal, sal_overlays), (ig, ig_overlays) = made["saliency"], made["integrated_gradients"]
    out = tmp_path / "report"
    code = cli.main(
        ["report", str(sal), str(ig), "-o", str(out), "--labels", str(labels)]
        + ["--overlays", str(sal_overlays), "--overlays", str(ig_overlays)]
    )
    assert code == 0
    group = zarr.open_group(str(sal), mode="r", use_consolidated=False)  # arrays added after the job
    status, classes, scores = group["status"][:], group["classes"][:], group["scores"][:]
    probabilities, deletion = group["probabilities"][:], group["metrics/deletion"][:]
    paths = [str(p) for p in group["paths"][:]]
    n = len(status)
    pages = sorted(out.glob("page-*.html"))
    assert len(pages) == -(-n // 3)  # a page per chunk of the store

    # Every picture on every page loads: the ok photos and each overlay fastsal run wrote.
    overlay_files = {p.name for d in (sal_overlays, ig_overlays) for p in d.glob("*.png")}
    seen_overlays = set()
    for page in pages:
        open_page(browser, page)
        loaded = load_all_images(browser)
        assert loaded and all(i["width"] > 0 for i in loaded), [i for i in loaded if not i["width"]]
        seen_overlays |= {Path(unquote(i["src"])).name for i in loaded if "overlays-" in i["src"]}
    assert seen_overlays == overlay_files

    # The failed image's reason is shown, in red.
    failed = int(np.flatnonzero(status == jobs.FAILED)[0])
    page = out / f"page-{failed // 3 + 1:04d}.html"
    open_page(browser, page)
    reason = jobs.status(str(sal))["failed"][0]["reason"]
    text = browser.find_element("id", f"i-{failed}").text
    assert "failed" in text and reason in text

    # Colours: a canvas's pixels are the colour table's rows at the map's values (shrunk, quantised).
    ok_row = int(np.flatnonzero(status == jobs.OK)[-1])
    open_page(browser, out / f"page-{ok_row // 3 + 1:04d}.html")
    for mode in ("map", "page"):
        set_control(browser, "scale", mode)
        for store, (path, cmap) in enumerate(((sal, "inferno"), (ig, "RdBu_r"))):
            maps = zarr.open_group(str(path), mode="r")["maps"][:]
            page_rows = [
                i for i in range(ok_row // 3 * 3, min(n, ok_row // 3 * 3 + 3)) if status[i] == jobs.OK
            ]
            page_max = max(np.abs(maps[i]).max() for i in page_rows)
            pixels = browser.execute_script(
                "const c = document.querySelector(`#i-${arguments[0]} canvas[data-store='${arguments[1]}']`);"
                "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);",
                ok_row,
                store,
            )
            value = maps[ok_row, 0]
            scale = np.abs(value).max() if mode == "map" else page_max
            q = np.round(127 * value / np.abs(value).max())
            level = q / 127 * np.abs(value).max() / scale
            # the page's rule, with JavaScript's Math.round (halves up)
            row = (
                np.floor((np.clip(level, -1, 1) + 1) * 127.5 + 0.5)
                if cmap == "RdBu_r"
                else np.floor(np.clip(level, 0, 1) * 255 + 0.5)
            )
            table = np.round(np.asarray(colormaps[cmap](np.linspace(0, 1, 256)))[:, :3] * 255)
            expected = table[row.astype(int).ravel()]
            got = np.asarray(pixels, float).reshape(-1, 4)[:, :3]
            np.testing.assert_allclose(got, expected, atol=1)  # canvas colour rounding
        screenshot(browser, tmp_path, f"page-scale-{mode}.png")
    assert (zarr.open_group(str(ig), mode="r")["maps"][:][status == jobs.OK] < 0).any(), "IG summed: signed"

    # The index: every image; sorting and filtering over all of them.
    open_page(browser, out / "index.html")
    screenshot(browser, tmp_path, "index.png")
    assert visible_ids(browser) == list(range(n))
    top = np.array([scores[i, classes[i, 0]] if status[i] == jobs.OK else np.nan for i in range(n)])
    set_control(browser, "sort-dir", "desc")
    set_control(browser, "sort-key", "score")
    ok = np.flatnonzero(status == jobs.OK)
    assert visible_ids(browser) == [*ok[np.argsort(-top[ok], kind="stable")], failed]  # missing last
    set_control(browser, "sort-key", "prob")
    top_prob = probabilities[ok, classes[ok, 0]]
    assert visible_ids(browser)[: len(ok)] == list(ok[np.argsort(-top_prob, kind="stable")])
    set_control(browser, "sort-key", "deletion (saliency)")  # a metric, named by its store
    assert visible_ids(browser)[: len(ok)] == list(ok[np.argsort(-deletion[ok, 0], kind="stable")])
    screenshot(browser, tmp_path, "index-sorted-by-deletion.png")
    set_control(browser, "sort-key", "index")
    set_control(browser, "sort-dir", "asc")
    set_control(browser, "filter-status", "failed")
    assert visible_ids(browser) == [failed]
    set_control(browser, "filter-status", "")
    wanted = int(classes[ok[0], 1])  # a second class: the filter looks at every class of an image
    set_control(browser, "filter-class", LABELS[wanted].split(" ", 1)[1].split(",")[0].upper())
    has = [i for i in range(n) if status[i] == jobs.OK and wanted in classes[i]]
    assert visible_ids(browser) == has and len(has) < n
    set_control(browser, "filter-class", str(wanted))
    assert visible_ids(browser) == has
    set_control(browser, "filter-class", "")
    threshold = float(np.median(deletion[ok, 0]))
    set_control(browser, "filter-field", "deletion (saliency)")
    set_control(browser, "filter-min", str(threshold))
    assert visible_ids(browser) == [i for i in ok if deletion[i, 0] >= threshold]
    screenshot(browser, tmp_path, "index-filtered.png")

    # A page sorts its own rows the same way; the names come from synset_words.txt.
    open_page(browser, pages[0])
    set_control(browser, "sort-dir", "desc")
    set_control(browser, "sort-key", "score")
    rows = [i for i in range(3) if status[i] == jobs.OK]
    assert visible_ids(browser)[: len(rows)] == sorted(rows, key=lambda i: -top[i])
    first_ok = rows[0]
    assert LABELS[classes[first_ok, 0]].split(" ", 1)[1] in browser.find_element("id", f"i-{first_ok}").text
    assert Path(paths[first_ok]).name in browser.find_element("id", f"i-{first_ok}").text
    screenshot(browser, tmp_path, "page-1-sorted.png")


def test_metric_columns_leave_out_curves(stores):
    """A store fastsal evaluate wrote to holds curves and per-step arrays beside each (image, class)
    metric: the report's columns are the metrics alone (it refused such stores before)."""
    made, _, _ = stores
    assert sorted(report._open(str(made["saliency"][0])).metrics) == ["deletion"]


def test_signed_as_export_decides(stores, tmp_path):
    """A store whose plan makes signed maps (reduce="sum") takes the diverging scale even where no map
    happens to be negative, as fastsal export's overlays do: one rule for both."""
    made, _, _ = stores
    copy = tmp_path / "ig.zarr"
    shutil.copytree(made["integrated_gradients"][0], copy)
    maps = zarr.open_group(str(copy), mode="r+")["maps"]
    maps[...] = np.abs(maps[:])  # no negative value left
    out = tmp_path / "report"
    write_report([copy], out)
    assert "diverging, centred on zero" in (out / "index.html").read_text()
    assert report._open(str(copy)).signed == signed_maps(jobs.status(str(copy))["plan"]) is True
    assert report._open(str(made["saliency"][0])).signed is False  # absmax maps: sequential
    # occlusion's default channel reduction is the mean of signed score drops
    assert signed_maps({"method": "occlusion", "options": {"reduce": "mean"}})
    assert not signed_maps({"method": "occlusion", "options": {"reduce": "absmax"}})


def test_probabilities_only_when_the_store_has_them(stores, tmp_path):
    made, _, _ = stores
    out = tmp_path / "report"
    write_report([made["integrated_gradients"][0]], out)
    page = (out / "page-0001.html").read_text()
    assert "<th>probability</th>" not in page and "<th>score</th>" in page
    write_report([made["saliency"][0]], tmp_path / "with")
    assert "<th>probability</th>" in (tmp_path / "with" / "page-0001.html").read_text()


def test_a_store_of_npy_inputs(model, tmp_path):
    """Inputs from a .npy have no files: the rows say so, with maps and classes as ever."""
    prototxt, weights = model
    inputs = np.random.default_rng(4).normal(0, 40, (3, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "inputs.npy", inputs)
    store = tmp_path / "npy.zarr"
    run = ["run", str(tmp_path / "inputs.npy"), "--model-def", prototxt, "--pretrained-model", weights]
    assert cli.main([*run, "-o", str(store), "--quiet"]) == 0
    write_report([store], tmp_path / "report")
    page = (tmp_path / "report" / "page-0001.html").read_text()
    assert page.count("no file (a .npy input)") == 3 and page.count('<canvas class="map"') == 3
    assert "<img" not in page


def synthetic_store(folder: Path, count: int, side: int, chunk: int) -> Path:
    """A store as fastsal run writes it, built directly with zarr: photos, maps, classes, scores,
    status (every 97th image failed, with its reason in its chunk's marker) and the plan."""
    images = folder / "images"
    images.mkdir()
    tiny = Image.fromarray(photo(np.random.default_rng(0), 24, 24))
    paths = []
    for i in range(count):
        paths.append(str(images / f"img{i:05d}.png"))
        tiny.save(paths[-1], compress_level=0)
    rng = np.random.default_rng(3)
    out = folder / "big.zarr"
    group = zarr.open_group(str(out), mode="w")
    status = np.full(count, jobs.OK, np.int8)
    status[::97] = jobs.FAILED
    maps = rng.gamma(2.0, 1.0, (count, 1, side, side)).astype(np.float32)
    classes = rng.integers(0, 10, (count, 1)).astype(np.int32)
    scores = rng.normal(0, 3, (count, 10)).astype(np.float32)
    failed = status == jobs.FAILED  # as fastsal run leaves them: no maps, classes or scores
    maps[failed], classes[failed], scores[failed] = np.nan, -1, np.nan
    for name, data in (("maps", maps), ("classes", classes), ("scores", scores), ("status", status)):
        group.create_array(name, data=data, chunks=(chunk, *data.shape[1:]))
    with warnings.catch_warnings():  # zarr: its variable-length strings are not in the v3 spec yet
        warnings.simplefilter("ignore")
        group.create_array("paths", shape=(count,), chunks=(count,), dtype=str)[:] = np.array(
            paths, dtype=object
        )
    plan = {
        "method": "saliency",
        "options": {},
        "chunk_size": chunk,
        "inputs": {"count": count, "sha256": "x"},
    }
    group.attrs["fastsal"] = {"plan": plan, "version": "test"}
    (out / jobs.MARKERS).mkdir()
    for c in range(-(-count // chunk)):
        span = range(c * chunk, min(count, (c + 1) * chunk))
        failed = {str(i): "cannot decode: synthetic" for i in span if status[i] == jobs.FAILED}
        (out / jobs.MARKERS / f"chunk-{c:06d}.json").write_text(
            json.dumps({"chunk": c, "ok": len(span) - len(failed), "failed": failed})
        )
    return out


def test_ten_thousand_images_first_page_renders(browser, tmp_path):
    store = synthetic_store(tmp_path, 10_000, 40, 100)
    out = tmp_path / "report"
    write_report([store], out, map_side=32)
    assert len(list(out.glob("page-*.html"))) == 100
    for name in ("page-0001.html", "index.html"):
        seconds = open_page(browser, out / name, timeout=30.0)  # a sanity bound, not a benchmark
        print(f"{name}: rendered in {seconds:.2f} s")
        screenshot(browser, tmp_path, f"large-{name.replace('.html', '.png')}")
    assert visible_ids(browser) == list(range(500))  # the index lists 500 rows at a time
    assert browser.find_element("id", "shown").text == "10000 of 10000 match; the first 500 listed"
    browser.find_element("id", "more").click()
    assert visible_ids(browser) == list(range(1000))
    set_control(browser, "filter-status", "failed")
    assert visible_ids(browser) == list(range(0, 10_000, 97))
    open_page(browser, out / "page-0001.html")
    loaded = load_all_images(browser)
    assert len(loaded) == 100 - 2 and all(i["width"] > 0 for i in loaded)  # images 0 and 97 failed
    sizes = browser.execute_script("return Array.from(document.querySelectorAll('canvas.map'), c => c.width)")
    assert sizes and set(sizes) == {20}  # 40 pixels shrunk by 2 to fit 32


def test_shrink_and_quantise_against_loops():
    rng = np.random.default_rng(11)
    maps = rng.normal(0, 1, (2, 3, 70, 45)).astype(np.float32)
    small = shrink(maps, 32)  # factor 3: 70 -> 24 blocks (the last padded with the edge row), 45 -> 15
    expected = np.empty((2, 3, 24, 15))
    for y in range(24):
        for x in range(15):
            rows = [min(r, 69) for r in range(3 * y, 3 * y + 3)]
            cols = [min(c, 44) for c in range(3 * x, 3 * x + 3)]
            expected[:, :, y, x] = maps[:, :, rows][:, :, :, cols].mean(axis=(2, 3))
    np.testing.assert_allclose(small, expected, rtol=1e-5, atol=1e-6)
    assert shrink(maps, 70) is maps
    text, top = quantise(small[0, 0])
    q = np.frombuffer(base64.b64decode(text), np.uint8).reshape(small[0, 0].shape)
    assert top == pytest.approx(np.abs(small[0, 0]).max())
    np.testing.assert_allclose((q.astype(float) - 128) / 127 * top, small[0, 0], atol=top / 254 + 1e-7)
    assert q.min() >= 1 and (q == 128).sum() < q.size  # signed: both sides of zero used


def test_refusals_and_reruns(stores, model, tmp_path):
    made, labels, folder = stores
    sal = made["saliency"][0]
    # Stores over other images are refused, with both names.
    other_images = tmp_path / "other"
    other_images.mkdir()
    Image.fromarray(photo(np.random.default_rng(1), 40, 40)).save(other_images / "one.png")
    prototxt, weights = model
    other = tmp_path / "other.zarr"
    assert (
        cli.main(
            [
                "run",
                str(other_images),
                "--model-def",
                prototxt,
                "--pretrained-model",
                weights,
                "-o",
                str(other),
                "--quiet",
            ]
        )
        == 0
    )
    with pytest.raises(ReportError, match=r"different image lists \(8 vs 1 images\)"):
        write_report([sal, other], tmp_path / "r1")
    assert not (tmp_path / "r1").exists()
    # An overlays folder of another store, a labels file of another class count, not a store.
    with pytest.raises(ReportError, match="holds the overlays of .*integrated_gradients.zarr, not of"):
        write_report([sal], tmp_path / "r2", overlays=[made["integrated_gradients"][1]])
    short = tmp_path / "short.txt"
    short.write_text("a\nb\n")
    with pytest.raises(ValueError, match="names 2 classes; the net has 5"):
        write_report([sal], tmp_path / "r3", labels=short)
    with pytest.raises(jobs.JobError, match="not a fastsal store"):
        write_report([folder / "images"], tmp_path / "r4")
    for name in ("r1", "r2", "r3", "r4"):
        assert not (tmp_path / name).exists()
    # A folder holding someone's files is refused and left as it was; the CLI says so in one line.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "index.html").write_text("my page")
    assert cli.main(["report", str(sal), "-o", str(theirs)]) == cli.EXIT_REFUSED
    assert [p.name for p in theirs.iterdir()] == ["index.html"] and (
        theirs / "index.html"
    ).read_text() == "my page"
    # A rerun replaces the report's own files only: fewer pages remove the earlier extra ones, and a
    # file the user put there stays; a user's file with a report file's name is refused.
    out = tmp_path / "report"
    write_report([sal], out, page_size=2)
    assert len(list(out.glob("page-*.html"))) == 4
    (out / "notes.txt").write_text("mine")
    write_report([sal], out, page_size=4, labels=labels)
    assert sorted(p.name for p in out.glob("page-*.html")) == ["page-0001.html", "page-0002.html"]
    assert (out / "notes.txt").read_text() == "mine" and "thing" in (out / "page-0001.html").read_text()
    (out / "page-0003.html").write_text("mine too")
    with pytest.raises(ReportError, match="page-0003.html, which fastsal report did not write"):
        write_report([sal], out, page_size=2)
    assert (out / "page-0003.html").read_text() == "mine too"
