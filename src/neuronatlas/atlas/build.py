"""The atlas's data chunks: every result of one (model, dataset, site) as small script files the page loads on demand.

A page opened from disk (file://) may not fetch files, so every chunk is a script that hands its data to the page:
``atlas.add("<key>", {...});`` (the page adds a ``<script src>`` for the chunk it needs). Arrays with a value per
neuron, example or token are typed arrays (little-endian; float32 values, integer ids): base64 of their bytes,
deflated (zlib) when that is shorter, ``{"t": "f4", "z": "..."}`` or ``{"t": "u2", "b": "..."}``; the page inflates
them with the browser's DecompressionStream. Deflate finds the contexts that many neurons of a block share (the same
window around the same maximum). Other numbers are JSON rounded to `digits` significant digits. Per site (folder
``data/<model>/<dataset>/<site>/``):

- ``site.js``       shape, layers, what ran here (clusterings, N2G, textualization, pruning, MoE), layer summaries
- ``strings.js``    the text pieces the example and top-token chunks index
- ``L<l>.js``       one layer, every neuron: max, mean, variance, eq. 1 top tokens, pruning scores and ranks, MoE
                    expert, textualization rows, which neurons have examples and N2G graphs
- ``L<l>-b<j>.js``  the examples of `block` neurons of one layer: key activation, document, position, and per token
                    of the context its text piece and its activation quantised to int8 of the neuron's largest |value|
- ``n2g-L<l>.js``   N2G graphs (SVG) and scores of one layer's explained neurons
- ``c-<variant>-k<K>[-refined].js``  one clustering: every neuron's cluster, sizes, explanation tokens, ablation effects
- ``search.js``     token search: normalised token -> the neurons that rank it among their eq. 1 top tokens

The index (``data/index.js``) lists the sites with these summaries and the replication verdicts; ``index.html``
holds the app (static/atlas.js, static/atlas.css inlined).
"""

from __future__ import annotations

import base64
import json
import math
import re
import zlib
from collections.abc import Mapping, Sequence
from importlib import resources as package_files
from pathlib import Path
from typing import Any

import numpy as np

from neuronatlas.atlas import examples as atlas_examples
from neuronatlas.core import tables
from neuronatlas.core.errors import NeuronAtlasError
from neuronatlas.core.io import atomic_dir, atomic_path, read_json, write_json

FORMAT_VERSION = 1
SUMMARY = "summary.json"  # a site's summary for the index job (not loaded by the page)
_CODES = {"uint8": "u1", "int8": "i1", "uint16": "u2", "int16": "i2", "uint32": "u4", "int32": "i4", "float32": "f4", "float64": "f8"}
_TOKEN_PREFIX = re.compile(r"^(?:##|\u0120|\u2581)+")
N2G_METRICS = (
    "firing_precision",
    "firing_recall",
    "firing_f1",
    "nonfiring_precision",
    "nonfiring_recall",
    "nonfiring_f1",
    "pearson",
    "test_examples",
    "tokens",
)
TEXTUALIZATION_COLUMNS = (
    "word",
    "act_word",
    "act_initial",
    "act_optimized",
    "cos_closest",
    "closest_is_most_activating",
    "rank_of_most_activating",
)

# ----------------------------------------------------------------------------- encoding


def search_key(text: str) -> str:
    """A token's search key: trimmed, lower case, without subword markers (##, Ġ, ▁); atlas.js normalises queries the same way."""
    return _TOKEN_PREFIX.sub("", text.strip()).strip().lower()


def typed(array: np.ndarray) -> dict[str, str]:
    """A numeric array as base64 of its little-endian bytes (`b`), or of their zlib deflate (`z`) when shorter, with
    its type code (u1 i1 u2 i2 u4 i4 f4 f8)."""
    a = np.ascontiguousarray(array)
    code = _CODES.get(a.dtype.name)
    if code is None:
        raise TypeError(f"no typed-array code for dtype {a.dtype}")
    raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
    packed = zlib.compress(raw, 9)
    if len(packed) < len(raw):
        return {"t": code, "z": base64.b64encode(packed).decode("ascii")}
    return {"t": code, "b": base64.b64encode(raw).decode("ascii")}


def floats(values: Any) -> dict[str, str]:
    """Numbers as a float32 typed array (NaN where missing)."""
    return typed(np.asarray(values, np.float64).astype(np.float32).reshape(-1))


def index_array(values: np.ndarray, none: np.ndarray) -> dict[str, str]:
    """Non-negative indices as the narrowest unsigned typed array; the type's maximum marks `none`."""
    values = np.asarray(values, np.int64)
    dtype = np.uint16 if values.max(initial=0) < 0xFFFF else np.uint32
    return typed(np.where(none, np.iinfo(dtype).max, values).astype(dtype))


def number(value: Any, digits: int) -> float | int | None:
    """A number rounded to `digits` significant digits (None for NaN / infinite / missing)."""
    if value is None:
        return None
    x = float(value)
    if not math.isfinite(x):
        return None
    r = float(f"{x:.{digits}g}")
    return int(r) if r.is_integer() and abs(r) < 2**53 else r


def _plain(value: Any) -> Any:
    """NumPy scalars as Python ones (json's fallback)."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def chunk_text(key: str, data: Any) -> str:
    """The script of one chunk (ASCII JSON, so the page's charset cannot matter)."""
    return f"atlas.add({json.dumps(key)},{json.dumps(data, separators=(',', ':'), allow_nan=False, default=_plain)});\n"


def write_chunk(folder: Path, site_key: str, name: str, data: Any) -> None:
    """Write chunk `name` of a site (key `<site_key>/<name>`, file `<name>.js`)."""
    (folder / f"{name}.js").write_text(chunk_text(f"{site_key}/{name}", data), encoding="ascii")


def read_chunk(path: str | Path) -> tuple[str, Any]:
    """(key, data) of a chunk file (tests and the index job read them back)."""
    text = Path(path).read_text(encoding="ascii")
    m = re.fullmatch(r'atlas\.add\(("(?:[^"\\]|\\.)*"),(.*)\);\n', text, re.S)
    if m is None:
        raise NeuronAtlasError(f"{path} is not an atlas chunk")
    return json.loads(m.group(1)), json.loads(m.group(2))


def decode(obj: Mapping[str, str]) -> np.ndarray:
    """The array of a `typed` object (as the page decodes it)."""
    dtype = {v: k for k, v in _CODES.items()}[obj["t"]]
    raw = zlib.decompress(base64.b64decode(obj["z"])) if "z" in obj else base64.b64decode(obj["b"])
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))


def clustering_file(name: str) -> str:
    """Chunk name of a clustering `variant/k{K}[-refined]`."""
    return "c-" + name.replace("/", "-")


# ----------------------------------------------------------------------------- reading the methods' outputs


def _clustering(name: str, entry: Mapping[str, str], n_neurons: int, top: int, digits: int) -> dict[str, Any]:
    """One clustering: every neuron's cluster (-1 = not in it), sizes, explanation tokens and ablation effects."""
    import pandas as pd

    frame = pd.read_parquet(entry["clusters"], columns=["neuron_id", "cluster"])
    ids = np.full(n_neurons, -1, np.int32)
    if len(frame) and int(frame["neuron_id"].max()) >= n_neurons:
        raise NeuronAtlasError(f"{entry['clusters']} names neuron ids beyond the site's {n_neurons} neurons; re-run the clusters stage")
    ids[frame["neuron_id"].to_numpy()] = frame["cluster"].to_numpy()
    variant, stem = name.split("/")
    k = int(stem[1:].split("-")[0])
    sizes = np.bincount(ids[ids >= 0], minlength=k)
    explanations: dict[str, list[list[Any]]] = {}
    for row in tables.read_rows(entry["explanations"]):
        tokens = explanations.setdefault(str(int(row["cluster"])), [])
        if int(row["rank"]) <= top:
            text = row["text"] if isinstance(row["text"], str) else str(row["token"])
            tokens.append([text, number(row["score"], digits), int(row["rank"])])
    for tokens in explanations.values():
        tokens.sort(key=lambda t: t[2])
        for t in tokens:
            t.pop()
    effects = _effects(entry["intervention"], digits) if "intervention" in entry else None
    return {
        "name": name,
        "variant": variant,
        "k": k,
        "refined": stem.endswith("-refined"),
        "ids": typed(ids.astype(np.int16 if k < 2**15 else np.int32)),
        "sizes": sizes.tolist(),
        "tokens": explanations,
        "effects": effects,
    }


def _effects(path: str, digits: int) -> dict[str, Any]:
    """Per evaluated cluster of an intervention CSV: status, losses, its % change and each baseline's (mean, CI)."""
    rows = tables.read_rows(path)
    baselines = sorted(
        {c[: -len("_change_pct")] for r in rows[:1] for c in r if c.endswith("_change_pct") and "_seed" not in c} - {"cluster"}
    )
    out = {}
    for r in rows:
        out[str(int(r["cluster"]))] = {
            "status": r.get("status"),
            "sentences": number(r.get("n_sentences"), digits),
            "base_loss": number(r.get("base_loss"), digits),
            "loss": number(r.get("cluster_loss"), digits),
            "change": number(r.get("cluster_change_pct"), digits),
            "baselines": {
                b: [number(r.get(f"{b}_change_pct"), digits), number(r.get(f"{b}_ci_low"), digits), number(r.get(f"{b}_ci_high"), digits)]
                for b in baselines
            },
        }
    return {"baselines": baselines, "clusters": out, "objective": rows[0].get("objective") if rows else None}


def _n2g(entry: Mapping[str, Any], layers: Sequence[int], digits: int) -> dict[int, dict[int, dict[str, Any]]]:
    """Per layer and explained neuron: its scores per evaluation set and its graph (SVG, base64)."""
    out: dict[int, dict[int, dict[str, Any]]] = {}
    for row in tables.read_rows(entry["neurons"]):
        layer, neuron = int(row["layer"]), int(row["neuron"])
        if layer not in layers:
            continue
        item = out.setdefault(layer, {}).setdefault(neuron, {"scores": {}, "a_max": number(row.get("a_max"), digits)})
        item["scores"][str(row["eval_set"])] = {m: number(row[m], digits) for m in N2G_METRICS if m in row}
    for layer, neurons in out.items():
        folder = Path(entry["graphs"].get(str(layer), ""))
        for neuron, item in neurons.items():
            svg = folder / f"L{layer}-N{neuron}.svg"
            item["svg"] = base64.b64encode(svg.read_bytes()).decode("ascii") if svg.is_file() else None
    return out


def _textualization(files: Mapping[str, str], space: str, layers: Sequence[int], width: int, digits: int) -> dict[int, dict[str, Any]]:
    """Per layer: {neuron index: its single-neuron textualization row, compared with words in `space`}."""
    compared = {row["neuron_id"]: row for row in tables.read_rows(files["spaces"]) if row["space"] == space}
    out: dict[int, dict[str, Any]] = {}
    for row in tables.read_rows(files["neurons"]):
        row = {**row, **compared.get(row["neuron_id"], {})}
        layer, index = int(row["layer"]), int(row["index"])
        if layer not in layers or index >= width:
            continue
        item: dict[str, Any] = {}
        for c in TEXTUALIZATION_COLUMNS:
            v = row.get(c)
            item[c] = v if isinstance(v, str) else (bool(v) if isinstance(v, (bool, np.bool_)) else number(v, digits))
        j, closest = 1, []
        while f"closest_{j}" in row:
            closest.append([str(row[f"closest_{j}"]), number(row.get(f"closest_{j}_cos"), digits)])
            j += 1
        item["closest"] = closest
        out.setdefault(layer, {})[str(index)] = item
    return out


def _modularity(scores: Mapping[str, str], shape: tuple[int, int]) -> dict[str, dict[str, np.ndarray]]:
    """Per experiment: {task name: (L, W) selective-pruning scores}."""
    from neuronatlas.modularity.pruning import read_scores

    out: dict[str, dict[str, np.ndarray]] = {}
    for exp, path in scores.items():
        sf = read_scores(path)
        if tuple(sf.scores.shape[1:]) != tuple(shape):
            raise NeuronAtlasError(f"{path} scores {sf.scores.shape[1:]} neurons, the site has {shape}; re-run modularity_scores")
        out[exp] = {t.name: sf.scores[i] for i, t in enumerate(sf.tasks)}
    return out


def _ranks(values: np.ndarray) -> np.ndarray:
    """Rank of every entry (1 = largest; NaN last), flattened order."""
    flat = np.asarray(values, np.float64).reshape(-1)
    key = np.where(np.isnan(flat), -np.inf, flat)
    order = np.lexsort((np.arange(flat.size), -key))
    rank = np.empty(flat.size, np.int64)
    rank[order] = np.arange(1, flat.size + 1)
    return rank.reshape(np.shape(values))


def top_tokens(store: Any, manifest: Mapping[str, Any], layers: Sequence[int], n_top: int, min_count: int) -> dict[str, Any] | None:
    """Per layer, each neuron's eq. 1 top tokens: the token ids seen at least `min_count` times (specials dropped)
    with the largest mean activation. None when the store has no token statistics or no token qualifies."""
    from neuronatlas.clusters.representations import token_info

    if not store.has_token_stats or n_top < 1:
        return None
    ids, counts = store.token_ids(), store.token_count()
    info = token_info(manifest, ids)
    keep = np.flatnonzero((counts >= min_count) & ~np.isin(ids, np.fromiter(info.special_ids, np.int64, len(info.special_ids))))
    if keep.size == 0:
        return None
    r = min(n_top, keep.size)
    denom = counts[keep].astype(np.float32)[:, None]
    rows, values = {}, {}
    for layer in layers:
        # (T, W) eq. 1 means of the kept tokens; float32 is plenty to rank them
        means = np.divide(store.token_sum_layer(layer)[keep].astype(np.float32, copy=False), denom, dtype=np.float32)
        part = np.argpartition(-means, r - 1, axis=0)[:r] if r < keep.size else np.tile(np.arange(keep.size)[:, None], (1, means.shape[1]))
        vals = np.take_along_axis(means, part, axis=0)
        order = np.lexsort((np.take(ids[keep], part), -vals), axis=0)  # value desc, then token id asc
        rows[layer] = np.take_along_axis(part, order, axis=0).T  # (W, r) rows of `keep`
        values[layer] = np.take_along_axis(vals, order, axis=0).T
    texts = [info.text.get(int(i)) or info.token.get(int(i)) or str(int(i)) for i in ids[keep]]
    return {"rows": rows, "values": values, "texts": texts, "min_count": int(min_count), "candidates": int(keep.size)}


# ----------------------------------------------------------------------------- one site


def _texts(sel: atlas_examples.SiteExamples, pieces: Sequence[str], tops: Mapping[str, Any] | None) -> tuple[list[str], np.ndarray, Any]:
    """The site's text pieces (its examples' pieces, most used first so small indices deflate better, then the top
    tokens' texts), the examples' tokens as indices into them (-1 = none) and the top tokens' indices."""
    used, uses = np.unique(sel.tokens[sel.tokens >= 0], return_counts=True)
    used = used[np.argsort(-uses, kind="stable")]
    remap = np.full(len(pieces) + 1, -1, np.int64)
    remap[used] = np.arange(used.size)
    tokens = np.where(sel.tokens >= 0, remap[sel.tokens], -1)
    lookup = {pieces[i]: j for j, i in enumerate(used.tolist())}
    top_strings = np.asarray([lookup.setdefault(t, len(lookup)) for t in tops["texts"]], np.int64) if tops else None
    return sorted(lookup, key=lookup.__getitem__), tokens, top_strings


def shades(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per neuron the largest |activation| over its contexts, and every context activation as int8 of it (x 127)."""
    finite = np.where(np.isfinite(values), values, 0.0)
    scale = np.abs(finite).reshape(len(values), -1).max(axis=1, initial=0.0)
    return scale, np.rint(finite / np.maximum(scale, 1e-30)[:, None, None] * 127).clip(-127, 127).astype(np.int8)


def build_site(inputs: Mapping[str, Any], out_dir: str | Path, params: Mapping[str, Any]) -> dict[str, Any]:
    """Write the chunks of one (model, dataset, site) into `out_dir` (atomically); returns its summary."""
    from neuronatlas.core.store import open_store

    model, dataset, site = params["model"], params["dataset"], params["site"]
    key, digits, block = f"{model}/{dataset}/{site}", int(params["digits"]), int(params["block"])
    sel, pieces, ex_attrs = atlas_examples.read(inputs["examples"], site)
    manifest = read_json(inputs["manifest"])
    with open_store(inputs["stats"]) as st:
        n_layers, width = st.shape
        if (n_layers, width) != (sel.n_layers, sel.width):
            raise NeuronAtlasError(f"{inputs['examples']} was recomputed for another store shape; re-run atlas_examples")
        stats = {"max": st.neuron("max").astype(np.float64), "mean": st.neuron_mean(), "var": st.neuron_std() ** 2}
        top_k, n_tokens = st.top_k, int(st.attrs.get("n_tokens") or 0)
        tops = top_tokens(st, manifest, sel.layers, int(params["top_tokens"]), int(params["min_count"]))
    layers = sel.layers

    strings, tokens, top_strings = _texts(sel, pieces, tops)

    clusterings = {
        name: _clustering(name, entry, n_layers * width, int(params["explanation_tokens"]), digits)
        for name, entry in (inputs.get("clusterings") or {}).items()
    }
    n2g = _n2g(inputs["n2g"], layers, digits) if "n2g" in inputs else {}
    textualization = (
        _textualization(inputs["textualization"], params["compare_space"], layers, width, digits) if "textualization" in inputs else {}
    )
    pruning = _modularity(inputs.get("modularity") or {}, (n_layers, width))
    prune_ranks = {exp: {t: _ranks(s) for t, s in tasks.items()} for exp, tasks in pruning.items()}
    moe = None
    if "moe" in inputs:
        from neuronatlas.modularity.moe import read_clusters

        moe = read_clusters(inputs["moe"])
        if moe.shape != (n_layers, width):
            raise NeuronAtlasError(f"{inputs['moe']} holds {moe.shape} neurons, the site has {(n_layers, width)}; re-run modularity_moe")

    scale, quant = shades(sel.values)
    e = sel.values.shape[1]
    ex_layer, ex_index = sel.neurons // width, sel.neurons % width

    layer_rows = []
    with atomic_dir(out_dir) as tmp:
        folder = Path(tmp)
        for layer in layers:
            mine = np.flatnonzero(ex_layer == layer)
            idx = ex_index[mine]
            chunk: dict[str, Any] = {
                "layer": layer,
                **{name: floats(values[layer]) for name, values in stats.items()},
                "ex": None if idx.size == width else idx.tolist(),
                "n2g": sorted(n2g.get(layer, {})),
                "tx": textualization.get(layer, {}),
                "moe": None if moe is None else typed(moe[layer].astype(np.int16)),
                "prune": _pruning_chunk(pruning, prune_ranks, layer),
                "top": None if tops is None else _top_tokens_chunk(tops, top_strings, layer),
            }
            write_chunk(folder, key, f"L{layer}", chunk)
            for j, lo in enumerate(range(0, idx.size, block)):
                part = mine[lo : lo + block]
                write_chunk(folder, key, f"L{layer}-b{j}", _examples_chunk(sel, part, layer, lo, scale, quant, tokens))
            if layer in n2g:
                write_chunk(folder, key, f"n2g-L{layer}", {str(n): item for n, item in sorted(n2g[layer].items())})
            mx = stats["max"][layer]
            layer_rows.append(
                {
                    "layer": layer,
                    "with_examples": int(idx.size),
                    "max": number(np.nanmax(mx) if mx.size else math.nan, digits),
                    "mean_max": number(np.nanmean(mx) if mx.size else math.nan, digits),
                    "n2g": len(n2g.get(layer, {})),
                    "textualization": len(textualization.get(layer, {})),
                }
            )
        for name, data in clusterings.items():
            write_chunk(folder, key, clustering_file(name), data)
        write_chunk(folder, key, "strings", strings)
        search = None
        if tops is not None:
            search = _search_index(tops, layers, width)
            write_chunk(folder, key, "search", search)
        site_data = {
            "format": FORMAT_VERSION,
            "key": key,
            "model": model,
            "dataset": dataset,
            "site": site,
            "n_layers": n_layers,
            "width": width,
            "layers": layers,
            "layer_rows": layer_rows,
            "top_k": top_k,
            "examples": int(e),
            "context": int(ex_attrs["context"]),
            "block": block,
            "n_tokens": n_tokens,
            "neurons_with_examples": int(sel.neurons.size),
            "key_error": number(sel.key_error, 3),
            "clusterings": [
                {k: v for k, v in data.items() if k in ("name", "variant", "k", "refined")}
                | {"n_clusters": int(np.count_nonzero(data["sizes"])), "ablated": data["effects"] is not None}
                for data in clusterings.values()
            ],
            "pruning": {exp: list(tasks) for exp, tasks in pruning.items()},
            "moe": None if moe is None else int(moe.max(initial=-1) + 1),
            "n2g": sum(len(v) for v in n2g.values()),
            "textualization": sum(len(v) for v in textualization.values()),
            "search": None
            if search is None
            else {"tokens": len(search["keys"]), "top": tops["rows"][layers[0]].shape[1], "min_count": tops["min_count"]},
        }
        write_chunk(folder, key, "site", site_data)
        files = sorted(p for p in folder.iterdir() if p.suffix == ".js")
        summary = {k: v for k, v in site_data.items() if k != "layer_rows"}
        summary.update(files=len(files), bytes=sum(p.stat().st_size for p in files))
        write_json(folder / SUMMARY, summary)
    return summary


def _pruning_chunk(pruning: Mapping[str, Mapping[str, np.ndarray]], ranks: Mapping[str, Mapping[str, np.ndarray]], layer: int) -> dict:
    """One layer's pruning scores and ranks, per experiment and task."""
    return {
        exp: {t: {"score": floats(s[layer]), "rank": typed(ranks[exp][t][layer].astype(np.uint32))} for t, s in tasks.items()}
        for exp, tasks in pruning.items()
    }


def _top_tokens_chunk(tops: Mapping[str, Any], top_strings: np.ndarray, layer: int) -> dict[str, Any]:
    """One layer's highest-ranked tokens of the eq. 1 representation, per neuron."""
    rows = tops["rows"][layer]
    return {
        "r": rows.shape[1],
        "tok": index_array(top_strings[rows].reshape(-1), np.zeros(rows.size, bool)),
        "val": floats(tops["values"][layer]),
    }


def _examples_chunk(
    sel: Any, part: np.ndarray, layer: int, first: int, scale: np.ndarray, quant: np.ndarray, tokens: np.ndarray
) -> dict[str, Any]:
    """One block of a layer's neurons with examples: activations, where each example comes from, shaded tokens."""
    doc_type = np.int32 if sel.doc_id.max(initial=0) < 2**31 else np.float64
    return {
        "layer": layer,
        "first": first,
        "n": int(part.size),
        "act": floats(sel.activation[part]),
        "doc": typed(sel.doc_id[part].reshape(-1).astype(doc_type)),
        "pos": typed(np.where(sel.doc_id[part] >= 0, sel.position[part], -1).reshape(-1).astype(np.int32)),
        "scale": floats(scale[part]),
        "tok": index_array(tokens[part].reshape(-1), tokens[part].reshape(-1) < 0),
        "val": typed(quant[part].reshape(-1)),
    }


def _search_index(tops: Mapping[str, Any], layers: Sequence[int], width: int) -> dict[str, Any]:
    """Token search: sorted search keys, and per key the neurons ranking a token of that key among their top tokens
    (by rank, then value descending), as flat ids with their rank."""
    keys = [search_key(t) for t in tops["texts"]]
    neuron, rank, value, key = [], [], [], []
    key_ids = {k: i for i, k in enumerate(sorted(set(keys)))}
    row_key = np.asarray([key_ids[k] for k in keys], np.int64)
    for layer in layers:
        rows, vals = tops["rows"][layer], tops["values"][layer]  # (W, r)
        w, r = rows.shape
        neuron.append(np.repeat(layer * width + np.arange(w), r))
        rank.append(np.tile(np.arange(1, r + 1), w))
        value.append(vals.reshape(-1))
        key.append(row_key[rows.reshape(-1)])
    neuron_a, rank_a, value_a, key_a = (np.concatenate(x) for x in (neuron, rank, value, key))
    order = np.lexsort((neuron_a, -value_a, rank_a, key_a))
    ptr = np.searchsorted(key_a[order], np.arange(len(key_ids) + 1))
    return {
        "keys": sorted(key_ids, key=key_ids.__getitem__),
        "ptr": ptr.tolist(),
        "neuron": typed(neuron_a[order].astype(np.uint32)),
        "rank": typed(rank_a[order].astype(np.uint8)),
    }


# ----------------------------------------------------------------------------- the index and the page


def static_text(name: str) -> str:
    """A file of the app (src/neuronatlas/atlas/static/)."""
    return (package_files.files("neuronatlas.atlas") / "static" / name).read_text(encoding="utf-8")


def page_html() -> str:
    """index.html: the app's HTML with its stylesheet and script inlined (one file, no network)."""
    html = static_text("index.html")
    css, js = static_text("atlas.css"), static_text("atlas.js")
    if "/*ATLAS_CSS*/" not in html or "/*ATLAS_JS*/" not in html:
        raise NeuronAtlasError("static/index.html lacks the /*ATLAS_CSS*/ or /*ATLAS_JS*/ placeholder")
    return html.replace("/*ATLAS_CSS*/", css).replace("/*ATLAS_JS*/", js.replace("</script", "<\\/script"))


def claims(path: str | None, digits: int = 4) -> list[dict[str, Any]]:
    """The replication report's rows as the index shows them."""
    if not path:
        return []
    keep = ("paper", "claim_id", "reference", "claim", "paper_value", "model", "dataset", "scope", "statistic", "n", "verdict", "note")
    out = []
    for row in tables.read_rows(path):
        item = {k: (None if isinstance(row.get(k), float) and math.isnan(row[k]) else row.get(k)) for k in keep}
        item.update({k: number(row.get(k), digits) for k in ("estimate", "ci_low", "ci_high")})
        out.append(item)
    return out


def build_index(inputs: Mapping[str, Any], outputs: Mapping[str, str], params: Mapping[str, Any]) -> dict[str, Any]:
    """Write data/index.js (models, datasets, sites with their summaries, verdicts) and index.html."""
    sites = []
    for key, folder in inputs["sites"].items():
        summary = read_json(Path(folder) / SUMMARY)
        if summary["key"] != key:
            raise NeuronAtlasError(f"{folder} holds site {summary['key']!r}, expected {key!r}; re-run atlas_site")
        sites.append(summary)
    used_models = {s["model"] for s in sites}
    used_datasets = {s["dataset"] for s in sites}
    index = {
        "format": FORMAT_VERSION,
        "models": {m: v for m, v in params["models"].items() if m in used_models},
        "datasets": {d: v for d, v in params["datasets"].items() if d in used_datasets},
        "sites": sites,
        "claims": claims(inputs.get("claims")),
    }
    page = page_html()
    index["bytes"] = sum(s["bytes"] for s in sites) + len(page.encode()) + len(chunk_text("index", index).encode())
    with atomic_path(outputs["data"], suffix=".js") as tmp:
        Path(tmp).write_text(chunk_text("index", index), encoding="ascii")
    with atomic_path(outputs["html"], suffix=".html") as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
    return index
