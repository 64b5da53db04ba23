"""The neuron atlas: config and DAG side, the recomputed example windows against an independent forward pass,
the data chunks against the stores and the methods' outputs, and the page in a real headless browser."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from neuronatlas.atlas import build
from neuronatlas.atlas import dag as atlas_dag
from neuronatlas.atlas import examples as atlas_examples
from neuronatlas.core import config as core_config
from neuronatlas.core.errors import ConfigError

import helpers

# ----------------------------------------------------------------------------- config and DAG side


def _tiny(**overrides):
    return core_config.validate(helpers.tiny_config(Path("/tmp/unused"), **overrides))


def test_grid_holds_the_text_sites_and_follows_the_selection():
    cfg = _tiny()
    grid = atlas_dag.grid(cfg)
    assert ("tbert", "fix", "ffn_out") in grid and ("tgpt", "notes", "mlp") in grid
    assert not any(m.startswith("tvit") for m, _, _ in grid), "image datasets have no tokens to shade"
    cfg = _tiny(atlas={"models": ["tgpt"], "sites": ["mlp"]})
    assert atlas_dag.grid(cfg) == [("tgpt", "fix", "mlp"), ("tgpt", "notes", "mlp")]
    assert atlas_dag.pairs(cfg) == [("tgpt", "fix"), ("tgpt", "notes")]
    assert atlas_dag.targets(_tiny(atlas={"enabled": False})) == []
    # examples are capped by what the store keeps
    assert atlas_dag.examples_params(_tiny(atlas={"examples": 50}), "tgpt", "fix")["examples"] == 4


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"atlas\.models\[0\].*unknown model"):
        atlas_dag.check_config(_tiny(atlas={"models": ["nope"]}))
    with pytest.raises(ConfigError, match=r"atlas\.models\[0\].*no text dataset"):
        atlas_dag.check_config(_tiny(atlas={"models": ["tvit"]}))
    with pytest.raises(ConfigError, match=r"atlas\.datasets\[0\]"):
        atlas_dag.check_config(_tiny(atlas={"datasets": ["nope"]}))


def test_site_inputs_follow_what_the_config_runs():
    cfg = _tiny()
    results = cfg["results_dir"]
    mlp = atlas_dag.site_inputs(cfg, "tbert", "fix", "mlp")
    assert set(mlp["clusterings"]) == {f"{v}/k{k}{r}" for v in ("raw", "smooth") for k in (2, 4) for r in ("", "-refined")}
    assert mlp["clusterings"]["raw/k2"]["clusters"] == f"{results}/tbert/fix/mlp/clusters/raw/k2.parquet"
    assert "intervention" in mlp["clusterings"]["raw/k2-refined"] and "intervention" not in mlp["clusterings"]["smooth/k2-refined"]
    assert set(atlas_dag.site_inputs(cfg, "tbert", "fix", "ffn_out")) == {"stats", "examples", "manifest", "textualization"}
    gpt = atlas_dag.site_inputs(cfg, "tgpt", "fix", "mlp")
    assert gpt["n2g"]["graphs"] == {"1": f"{results}/tgpt/fix/mlp/n2g/graphs/layer-1"}
    assert "n2g" not in atlas_dag.site_inputs(cfg, "tgpt", "notes", "mlp")
    exp = {"model": "tgpt", "random_model": None, "tasks": ["fix"], "drops": [0.5], "moe": True}
    text = _tiny(modularity={"experiments": {"text": exp}})
    both = atlas_dag.site_inputs(text, "tgpt", "notes", "mlp")
    assert both["modularity"] == {"text": f"{results}/tgpt/modularity/text/scores.h5"}
    assert both["moe"] == f"{results}/tgpt/modularity/moe/clusters.parquet"
    assert "modularity" not in atlas_dag.site_inputs(text, "tgpt", "notes", "residual")


def test_resources_are_positive_before_any_input_exists():
    cfg = core_config.load(helpers.REPO / "config" / "config.yaml")
    for m, d in atlas_dag.pairs(cfg):
        r = atlas_dag.examples_resources(cfg, m, d)
        assert r["mem_mb"] > 1000 and r["runtime"] >= 10
    for m, d, s in atlas_dag.grid(cfg):
        r = atlas_dag.site_resources(cfg, m, d, s, None, attempt=2)
        assert r["mem_mb"] > 2000 and r["runtime"] >= 20


# ----------------------------------------------------------------------------- helpers of the chunks


def test_text_pieces_read_as_the_text():
    text = "Hello,  wonderful\nworld"
    offsets = np.array([[0, 5], [5, 6], [8, 17], [18, 23]])
    pieces = atlas_examples.text_pieces(text, offsets)
    assert pieces == ["Hello", ",", "  wonderful", "\nworld"]
    assert "".join(pieces) == text
    long = "x" + " " * 100 + "y"
    assert atlas_examples.text_pieces(long, np.array([[0, 1], [101, 102]]))[1] == "…" + " " * 46 + "y"


def test_neuron_sample_is_seeded_even_and_whole_below_the_cap():
    assert atlas_examples.sample_neurons(10, [0, 2], None, 0).tolist() == list(range(10)) + list(range(20, 30))
    assert atlas_examples.sample_neurons(10, [0, 2], 20, 0).size == 20
    a = atlas_examples.sample_neurons(100, [0, 1, 2], 30, 7)
    assert np.array_equal(a, atlas_examples.sample_neurons(100, [0, 1, 2], 30, 7))
    assert np.bincount(a // 100).tolist() == [10, 10, 10] and (np.diff(a) > 0).all()


def test_chunk_encoding_round_trips(tmp_path):
    x = np.array([-3, 0, 7], np.int16)
    assert np.array_equal(build.decode(build.typed(x)), x) and "b" in build.typed(x)
    long = np.tile(np.arange(50, dtype=np.uint16), 40)
    assert "z" in build.typed(long) and np.array_equal(build.decode(build.typed(long)), long)
    assert np.isnan(build.decode(build.floats([1.5, None]))[1])
    idx = build.index_array(np.array([1, 2, 70000]), np.array([False, True, False]))
    assert idx["t"] == "u4" and build.decode(idx).tolist() == [1, 2**32 - 1, 70000]
    assert build.index_array(np.array([1, 2]), np.array([False, True]))["t"] == "u2"
    assert [build.number(x, 3) for x in (1.23456, float("nan"), 2.0, 123456.7, None)] == [1.23, None, 2, 123000, None]
    build.write_chunk(tmp_path, "m/d/s", "x", {"a": [1, None], "t": "ü\u2028</script>"})
    assert build.read_chunk(tmp_path / "x.js") == ("m/d/s/x", {"a": [1, None], "t": "ü\u2028</script>"})
    assert (tmp_path / "x.js").read_bytes().isascii()
    assert build.search_key("  ##Ing ") == "ing" and build.search_key("\u0120The") == "the" and build.search_key("\u2581to") == "to"


def test_page_is_one_offline_file():
    html = build.page_html()
    assert "/*ATLAS_" not in html and "atlas.add" in html
    for remote in ("http://", "https://", "//cdn", "fetch("):
        assert remote not in html.replace("https://json-schema", ""), f"the page must not reach the network ({remote})"


# ----------------------------------------------------------------------------- the tiny DAG's atlas


def _chunks(folder: Path) -> dict[str, object]:
    return {p.stem: build.read_chunk(p)[1] for p in folder.glob("*.js")}


def test_examples_match_the_store_and_an_independent_forward_pass(tiny_dag):
    """Recomputed windows: the key value is the store's top-k activation, and every context value is the
    activation of a plain unbatched forward pass over the document's window (tokenised here, not by the job)."""
    import torch

    from neuronatlas.core import adapters, models
    from neuronatlas.core.corpus import read_shard, shard_files
    from neuronatlas.core.store import open_store

    work, cfg = tiny_dag
    results = cfg["results_dir"]
    for model, dataset in atlas_dag.pairs(cfg):
        path = atlas_dag.examples_output(results, model, dataset)
        lm = models.load(f"{results}/models/{model}/manifest.json", "cpu", "float32")
        texts = {}
        for f in shard_files(f"{results}/corpora/{dataset}/shards", core_config.stats_shards(cfg["datasets"][dataset])):
            shard = read_shard(f)
            texts.update(zip(shard["doc_id"].astype(int), shard["text"]))
        content = cfg["models"][model]["max_length"] - len(lm.manifest["prefix_ids"]) - len(lm.manifest["suffix_ids"])
        for site in atlas_dag.sites(cfg, model, dataset):
            sel, strings, attrs = atlas_examples.read(path, site)
            c = int(attrs["context"])
            with open_store(f"{results}/{model}/{dataset}/{site}/activations/stats.h5") as st:
                n_layers, width = st.shape
                assert sel.layers == list(range(n_layers))
                for row, flat in enumerate(sel.neurons.tolist()):
                    topk = st.topk(flat // width)
                    k = int((topk["doc_id"][flat % width] >= 0).sum())
                    got = np.flatnonzero(sel.doc_id[row] >= 0).size
                    assert got == min(k, sel.doc_id.shape[1])
                    np.testing.assert_allclose(sel.values[row, :got, c], topk["activation"][flat % width, :got], rtol=1e-4, atol=1e-5)
            assert sel.key_error < 1e-4
            # one example per layer against a forward pass of its own
            for layer in sel.layers:
                row = int(np.flatnonzero((sel.neurons // width == layer) & (sel.doc_id[:, 0] >= 0))[0])
                doc, start, pos = int(sel.doc_id[row, 0]), int(sel.start[row, 0]), int(sel.position[row, 0])
                ids = lm.tokenizer(texts[doc], add_special_tokens=False)["input_ids"][start : start + content]
                window = lm.manifest["prefix_ids"] + ids + lm.manifest["suffix_ids"]
                seen = {}
                record = lambda lay, x: seen.setdefault(lay, x[0, :, int(sel.neurons[row] % width)].clone())  # noqa: E731
                with torch.inference_mode(), adapters.hooked(lm.model, lm.family, site, record=record, layers={layer}):
                    lm.model(input_ids=torch.tensor([window]))
                acts = seen[layer].numpy()
                for j in range(-c, c + 1):
                    p = pos - start + j
                    if 0 <= p < len(ids):
                        at = len(lm.manifest["prefix_ids"]) + p
                        assert sel.values[row, 0, c + j] == pytest.approx(float(acts[at]), rel=1e-4, abs=1e-5)
                        piece = re.sub(r"[^a-z0-9]", "", strings[sel.tokens[row, 0, c + j]].lower())
                        assert re.sub(r"[^a-z0-9]", "", lm.tokenizer.decode([ids[p]]).lower()) in piece
                    else:
                        assert sel.tokens[row, 0, c + j] == -1 and np.isnan(sel.values[row, 0, c + j])


def test_chunks_hold_the_sites_results_compactly(tiny_dag):
    from neuronatlas.core.store import open_store

    work, cfg = tiny_dag
    results = cfg["results_dir"]
    total = 0
    for model, dataset, site in atlas_dag.grid(cfg):
        folder = Path(atlas_dag.site_dir(results, model, dataset, site))
        chunks = _chunks(folder)
        meta = chunks["site"]
        total += sum(p.stat().st_size for p in folder.glob("*.js"))
        blocks = [k for k in chunks if "-b" in k]
        # a chunk per layer and per block of neurons, never one per neuron
        assert len(blocks) == sum(-(-r["with_examples"] // meta["block"]) for r in meta["layer_rows"])
        assert len(chunks) <= 2 * len(meta["layers"]) + len(blocks) + len(meta["clusterings"]) + 3
        sel, strings, _ = atlas_examples.read(atlas_dag.examples_output(results, model, dataset), site)
        with open_store(f"{results}/{model}/{dataset}/{site}/activations/stats.h5") as st:
            mx = st.neuron("max")
            mean = st.neuron_mean()
        for layer in meta["layers"]:
            L = chunks[f"L{layer}"]
            np.testing.assert_array_equal(build.decode(L["max"]), mx[layer])
            np.testing.assert_allclose(build.decode(L["mean"]), mean[layer], rtol=1e-6)
            mine = sel.neurons[sel.neurons // meta["width"] == layer] % meta["width"]
            assert L["ex"] is None if mine.size == meta["width"] else L["ex"] == mine.tolist()
        # every stored example: dequantised values within one step of the recomputed ones, same text pieces
        site_strings = chunks["strings"]
        S = 2 * meta["context"] + 1
        for row, flat in enumerate(sel.neurons.tolist()):
            layer, index = divmod(flat, meta["width"])
            pos = index if chunks[f"L{layer}"]["ex"] is None else chunks[f"L{layer}"]["ex"].index(index)
            b = chunks[f"L{layer}-b{pos // meta['block']}"]
            r = pos - b["first"]
            tok = build.decode(b["tok"]).reshape(b["n"], -1, S)[r]
            val = build.decode(b["val"]).reshape(b["n"], -1, S)[r]
            scale = float(build.decode(b["scale"])[r])
            ok = sel.tokens[row] >= 0
            assert ((tok != np.iinfo(tok.dtype).max) == ok).all()
            assert [site_strings[t] for t in tok[ok]] == [strings[t] for t in sel.tokens[row][ok]]
            np.testing.assert_allclose(val[ok] / 127 * scale, sel.values[row][ok], atol=scale / 254 * 1.01 + 1e-9)
    assert total < 2 * 2**20, f"the tiny atlas takes {total} bytes"


def test_clusters_n2g_textualization_and_search_reach_their_neurons(tiny_dag):
    work, cfg = tiny_dag
    results = cfg["results_dir"]
    chunks = _chunks(Path(atlas_dag.site_dir(results, "tbert", "fix", "mlp")))
    inputs = atlas_dag.site_inputs(cfg, "tbert", "fix", "mlp")
    for name, entry in inputs["clusterings"].items():
        c = chunks[build.clustering_file(name)]
        frame = pd.read_parquet(entry["clusters"])
        ids = build.decode(c["ids"])
        assert (ids[frame["neuron_id"]] == frame["cluster"]).all() and (ids >= 0).sum() == len(frame)
        expl = pd.read_csv(entry["explanations"], keep_default_na=False)
        first = expl.sort_values(["cluster", "rank"]).groupby("cluster").head(1)
        assert {str(k): v[0][0] for k, v in c["tokens"].items()} == dict(zip(first["cluster"].astype(str), first["text"]))
        if "intervention" in entry:
            effects = pd.read_csv(entry["intervention"])
            assert set(c["effects"]["clusters"]) == set(effects["cluster"].astype(str))
            assert "random" in c["effects"]["baselines"]
    # token search: every listed neuron ranks the token among its top tokens (layer chunk)
    search, strings = chunks["search"], chunks["strings"]
    neurons, ranks = build.decode(search["neuron"]), build.decode(search["rank"])
    width = chunks["site"]["width"]
    for i, key in enumerate(search["keys"][:20]):
        for j in range(search["ptr"][i], search["ptr"][i + 1]):
            layer, n = divmod(int(neurons[j]), width)
            top = chunks[f"L{layer}"]["top"]
            tok = build.decode(top["tok"]).reshape(width, top["r"])[n]
            assert build.search_key(strings[tok[ranks[j] - 1]]) == key
    # N2G graphs and textualization rows on the sites they belong to
    gpt = _chunks(Path(atlas_dag.site_dir(results, "tgpt", "fix", "mlp")))
    n2g = pd.read_csv(f"{results}/tgpt/fix/mlp/n2g/neurons.csv")
    assert gpt["L1"]["n2g"] == sorted(set(n2g["neuron"]))
    assert all(item["svg"] and item["scores"]["topk"] for item in gpt["n2g-L1"].values())
    tx = pd.read_csv(f"{results}/tbert/textualization/single/neurons.csv")
    ffn = _chunks(Path(atlas_dag.site_dir(results, "tbert", "fix", "ffn_out")))
    assert sum(len(ffn[f"L{layer}"]["tx"]) for layer in ffn["site"]["layers"]) == len(tx)
    row = tx.iloc[0]
    assert ffn[f"L{row['layer']}"]["tx"][str(row["index"])]["word"] == row["word"]


def test_pruning_scores_and_moe_experts_reach_the_layer_chunks(tiny_dag, tmp_path):
    """The tiny grid prunes an image model only, so a site is rebuilt here with scores and MoE clusters of its shape."""
    from neuronatlas.core.store import open_store
    from neuronatlas.modularity import moe, pruning

    work, cfg = tiny_dag
    inputs = copy.deepcopy(atlas_dag.site_inputs(cfg, "tgpt", "fix", "mlp"))
    with open_store(inputs["stats"]) as st:
        L, W = st.shape
    rng = np.random.default_rng(0)
    scores = rng.random((2, L, W)).astype(np.float32)
    tasks = [pruning.Task("fix", "fix", "fix", None), pruning.Task("notes", "notes", "notes", None)]
    pruning.write_scores(tmp_path / "scores.h5", tasks, scores, scores, scores[0], scores[0], {})
    labels = rng.integers(0, 4, (L, W))
    moe.write_clusters(tmp_path / "clusters.parquet", labels)
    inputs.update(modularity={"text": str(tmp_path / "scores.h5")}, moe=str(tmp_path / "clusters.parquet"))
    params = {**atlas_dag.site_params(cfg, "tgpt", "fix", "mlp")}
    summary = build.build_site(inputs, tmp_path / "site", params)
    assert summary["pruning"] == {"text": ["fix", "notes"]} and summary["moe"] == 4
    chunks = _chunks(tmp_path / "site")
    flat = scores[1].reshape(-1)
    for layer in range(L):
        p = chunks[f"L{layer}"]["prune"]["text"]["notes"]
        np.testing.assert_array_equal(build.decode(p["score"]), scores[1, layer])
        rank = build.decode(p["rank"])
        assert [int((flat > v).sum()) + 1 for v in scores[1, layer]] == rank.tolist()
        assert build.decode(chunks[f"L{layer}"]["moe"]).tolist() == labels[layer].tolist()


# ----------------------------------------------------------------------------- the page in a browser


def _browser(profile: Path):
    """A headless Chromium under WebDriver (its profile in `profile`), or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -r requirements.txt)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Chromium or its WebDriver is not installed (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_path), options=opts)


def _shown(text: str) -> str:
    """A text piece as the page writes it (line breaks and tabs made visible, an empty piece marked)."""
    return re.sub(r"\r?\n", "↵", text).replace("\t", "→") or "∅"


def _open(driver, url: str, view: str) -> dict[str, str]:
    """Navigate (a new hash renders in place: the old page is marked stale first) and wait for `view`."""
    driver.execute_script("const m = document.getElementById('main'); if (m) m.dataset.state = 'stale';")
    driver.get(url)
    return _wait(driver, view)


def _search(driver, query: str) -> dict[str, str]:
    """Type a query into the header's search box, submit it and wait for the results."""
    box = driver.find_element("id", "q")
    box.clear()
    box.send_keys(query)
    driver.execute_script("document.getElementById('main').dataset.state = 'stale';")
    driver.find_element("css selector", "#search button").click()
    return _wait(driver, "search")


def _wait(driver, view: str, timeout: float = 20) -> dict[str, str]:
    """Wait until the page has rendered `view`; its state, render time (ms) and text."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = driver.execute_script(
            "const m = document.getElementById('main'); return m ? [m.dataset.state, m.dataset.view, m.dataset.ms || ''] : null;"
        )
        if state and state[0] in ("ready", "error") and state[1] == view:
            return {"state": state[0], "ms": state[2], "text": driver.find_element("id", "main").text}
        time.sleep(0.05)
    raise AssertionError(f"{driver.current_url} did not render {view} within {timeout}s")


def _severe(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def test_the_atlas_in_a_headless_browser(tiny_dag, tmp_path):
    """Index and neuron pages render from disk with no console error; search finds a known neuron and a token; the
    shading of one example is the stored activations."""
    from neuronatlas.core.store import open_store

    work, cfg = tiny_dag
    results = cfg["results_dir"]
    page = Path(atlas_dag.index_outputs(results)["html"]).resolve().as_uri()
    driver = _browser(tmp_path / "chromium")
    try:
        index = _open(driver, page, "index")
        assert index["state"] == "ready", index["text"]
        for m, d, s in atlas_dag.grid(cfg):
            assert f"{m}/{d}/{s}" in index["text"]
        assert "Replication verdicts" in index["text"]
        assert not _severe(driver)

        # the neuron: the first of tbert's sampled mlp neurons of layer 1 with a full set of examples
        sel, strings, attrs = atlas_examples.read(atlas_dag.examples_output(results, "tbert", "fix"), "mlp")
        width = sel.width
        row = int(np.flatnonzero((sel.neurons // width == 1) & (sel.doc_id >= 0).all(axis=1))[0])
        layer, n = divmod(int(sel.neurons[row]), width)
        key = "tbert/fix/mlp"
        neuron = _open(driver, f"{page}#/s/{key}/L{layer}-N{n}", "neuron")
        assert neuron["state"] == "ready", neuron["text"]
        assert int(neuron["ms"]) < 1000, f"the neuron page took {neuron['ms']} ms"
        for section in ("Statistics", "Top tokens", "Top examples", "Clusters"):
            assert section in neuron["text"]
        # example 0: one span per token of its context, shaded by the stored (recomputed) activation
        spans = driver.find_elements("css selector", '#examples .example[data-example="0"] .tok')
        c = int(attrs["context"])
        ok = sel.tokens[row, 0] >= 0
        assert [s.get_attribute("textContent") for s in spans] == [_shown(strings[t]) for t in sel.tokens[row, 0][ok]]
        shown = np.array([float(s.get_attribute("data-a")) for s in spans])
        scale = float(np.nanmax(np.abs(sel.values[row])))
        np.testing.assert_allclose(shown, sel.values[row, 0][ok], atol=scale / 254 * 1.01)
        key_span = driver.find_element("css selector", '#examples .example[data-example="0"] .tok.key')
        with open_store(f"{results}/tbert/fix/mlp/activations/stats.h5") as st:
            stored = float(st.topk(layer)["activation"][n, 0])
        assert float(key_span.get_attribute("data-a")) == pytest.approx(stored, abs=scale / 254 * 1.01)
        assert spans[int(ok[:c].sum())].get_attribute("class") == "tok key"
        alphas = [s.value_of_css_property("background-color") for s in spans]
        assert alphas[int(ok[:c].sum())].startswith("rgba(255, 122, 0") or alphas[int(ok[:c].sum())] == "rgb(255, 122, 0)"

        # search by neuron id, from the index page's search box
        _open(driver, f"{page}#/", "index")
        found = _search(driver, f"L{layer}-N{n}")
        hrefs = [a.get_attribute("href") for a in driver.find_elements("css selector", "a.hit")]
        assert any(h.endswith(f"#/s/{key}/L{layer}-N{n}") for h in hrefs), found["text"]
        # search by token: the top-ranked neuron of one token of this site
        chunks = _chunks(Path(atlas_dag.site_dir(results, "tbert", "fix", "mlp")))
        search = chunks["search"]
        i = next(i for i, k in enumerate(search["keys"]) if k.isalpha() and search["ptr"][i + 1] > search["ptr"][i])
        first = int(build.decode(search["neuron"])[search["ptr"][i]])
        _open(driver, f"{page}#/s/{key}", "site")
        found = _search(driver, search["keys"][i])
        hrefs = [a.get_attribute("href") for a in driver.find_elements("css selector", "a.hit")]
        assert any(h.endswith(f"#/s/{key}/L{first // width}-N{first % width}") for h in hrefs), found["text"]

        # the other views render too: layer (sorted), clustering, cluster, an N2G neuron
        assert _open(driver, f"{page}#/s/{key}/L{layer}?sort=max", "layer")["state"] == "ready"
        assert _open(driver, f"{page}#/s/{key}/c/raw/k2", "clustering")["state"] == "ready"
        cluster = _open(driver, f"{page}#/s/{key}/c/raw/k2/0", "cluster")
        assert cluster["state"] == "ready" and "Members" in cluster["text"]
        gpt = _chunks(Path(atlas_dag.site_dir(results, "tgpt", "fix", "mlp")))
        graph_neuron = gpt["L1"]["n2g"][0]
        g = _open(driver, f"{page}#/s/tgpt/fix/mlp/L1-N{graph_neuron}", "neuron")
        assert g["state"] == "ready" and "N2G graph" in g["text"]
        assert driver.find_element("css selector", ".graph img").get_attribute("naturalWidth") != "0"
        ffn = _open(driver, f"{page}#/s/tbert/fix/ffn_out", "site")
        assert ffn["state"] == "ready"
        assert not _severe(driver), _severe(driver)
    finally:
        driver.quit()


def test_the_demo_prints_the_atlas(tmp_path):
    """`make demo` ends with `python -m neuronatlas.cli summary`, which names the atlas page when it exists."""
    results = tmp_path / "results"
    (results / "summary").mkdir(parents=True)
    pd.DataFrame(
        [{"model": "m", "dataset": "d", "site": "mlp", "layers": 1, "width": 2, "documents": 1, "tokens": 3, "distinct_token_ids": 2}]
    ).to_csv(results / "summary" / "activations.csv", index=False)
    (results / "atlas").mkdir()
    (results / "atlas" / "index.html").write_text("<html></html>")
    cfg = helpers.tiny_config(tmp_path)
    cfg["results_dir"] = str(results)
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run(
        [sys.executable, "-m", "neuronatlas.cli", "summary", "--configfile", str(tmp_path / "c.yaml")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert f"Neuron atlas: {(results / 'atlas' / 'index.html').resolve()}" in out.stdout
