"""Jobs of the neuron-cluster stages (representations, clustering, explanations): one function per rule,
plus the config views the rule files use (grid, per-job params, resources).

workflow/scripts/cluster_*.py call these with what Snakemake hands them; tests call them directly.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import clustering as cl
from . import explain as ex
from . import representations as rp
from .errors import ConfigError, NeuronAtlasError
from .io import atomic_path, config_hash, read_json

PAPER_FIGURE_VARIANT = {"refinement": "filter", "embedding": "smooth", "positions": "filter"}


# ----------------------------------------------------------------------------- config views


def enabled(config: Mapping[str, Any]) -> bool:
    """Whether the cluster stages run (representations.models lists at least one model)."""
    return bool(config["representations"]["models"])


def grid(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(model, dataset, site) triples whose neurons are clustered, in config order."""
    rep = config["representations"]
    out = []
    for m in rep["models"]:
        spec = config["models"][m]
        for d in spec["datasets"]:
            for s in spec["sites"]:
                if s in rep["sites"]:
                    out.append((m, d, s))
    return out


def check_config(config: Mapping[str, Any]) -> None:
    """Cross-key checks of the cluster sections; each error names the key and the fix."""
    rep, clu, exp = config["representations"], config["clustering"], config["explanations"]
    for i, m in enumerate(rep["models"]):
        if m not in config["models"]:
            raise ConfigError(f"representations.models[{i}]", f"unknown model {m!r}; defined models: {', '.join(config['models'])}")
        if not config["models"][m]["token_stats"]:
            raise ConfigError(f"representations.models[{i}]", f"model {m!r} has token_stats: false, so it has no token means to cluster")
    for d in rep["min_count"]:
        if d not in config["datasets"]:
            raise ConfigError(f"representations.min_count.{d}", f"unknown dataset {d!r}; defined datasets: {', '.join(config['datasets'])}")
    if enabled(config) and not grid(config):
        raise ConfigError("representations.sites", f"none of {rep['sites']} is a site of the models {rep['models']}")
    variants = rep["variants"]
    for which in PAPER_FIGURE_VARIANT:
        v = exp["figures"][f"{which}_variant"]
        if v is not None and v not in variants:
            raise ConfigError(f"explanations.figures.{which}_variant", f"{v!r} is not among representations.variants {variants}")
    k = exp["figures"]["k"]
    if k is not None and k not in clu["k"]:
        raise ConfigError("explanations.figures.k", f"{k} is not among clustering.k {clu['k']}")
    b = clu["bootstrap"]
    if b["replicates"] > 0:
        if not config["activations"]["keep_shards"]:
            raise ConfigError(
                "clustering.bootstrap.replicates",
                "bootstrap resampling of shard sets needs the per-shard stores; set activations.keep_shards: true "
                "(or replicates: 0)",
            )
        if b["variant"] not in variants:
            raise ConfigError("clustering.bootstrap.variant", f"{b['variant']!r} is not among representations.variants {variants}")
    if clu["method"] in ("auto", "centroids") and max(clu["k"]) > clu["centroids"]["n"]:
        raise ConfigError("clustering.centroids.n", f"{clu['centroids']['n']} centroids cannot be cut into K = {max(clu['k'])} clusters; raise it above max(clustering.k)")


def min_count(config: Mapping[str, Any], dataset: str) -> int:
    """The frequency threshold of a dataset (its own entry, else min_count_default)."""
    rep = config["representations"]
    return int(rep["min_count"].get(dataset, rep["min_count_default"]))


def vectors_source(config: Mapping[str, Any]) -> str:
    """The smoothing vectors as `vectors.load` takes them (a downloadable name resolved to its fetched path)."""
    from .vectors import resolve

    return resolve(config["representations"]["smoothing"]["vectors"], config["results_dir"])


def representation_params(config: Mapping[str, Any], dataset: str, variant: str) -> dict[str, Any]:
    """Everything a representation job of `variant` depends on (and nothing else)."""
    rep = config["representations"]
    if variant == "raw":
        return {"variant": "raw"}
    if variant == "filter":
        return {"variant": "filter", "min_count": min_count(config, dataset)}
    if variant == "tfidf":
        return {"variant": "tfidf", "negative": rep["tfidf_negative"]}
    if variant == "smooth":
        sm = rep["smoothing"]
        return {"variant": "smooth", "vectors": vectors_source(config), "neighbors": sm["neighbors"], "lambda": sm["lambda"]}
    raise ConfigError("representations.variants", f"unknown variant {variant!r}; allowed: {', '.join(rp.VARIANTS)}")


def representation_source(variant: str) -> str | None:
    """The representation a variant is derived from (None: from stats.h5)."""
    return {"raw": None, "filter": "raw", "tfidf": "filter", "smooth": "filter"}[variant]


def tree_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """Everything a tree job depends on: method, linkage and (when they can matter) the centroid settings."""
    clu = config["clustering"]
    out: dict[str, Any] = {"method": clu["method"], "linkage": clu["linkage"]}
    if clu["method"] == "auto":
        out["exact_max_neurons"] = clu["exact_max_neurons"]
    if clu["method"] in ("auto", "centroids"):
        out["centroids"] = dict(clu["centroids"])
        out["seed"] = config["seed"]
    return out


def figure_variant(config: Mapping[str, Any], which: str) -> str:
    """Variant shown in figure `which` (refinement / embedding / positions): the configured one, else the
    paper's (filter, smooth, filter) when computed, else the first configured variant."""
    v = config["explanations"]["figures"][f"{which}_variant"]
    variants = config["representations"]["variants"]
    if v is not None:
        return v
    return PAPER_FIGURE_VARIANT[which] if PAPER_FIGURE_VARIANT[which] in variants else variants[0]


def figure_k(config: Mapping[str, Any]) -> int:
    """K shown in the figures (explanations.figures.k, else the first of clustering.k)."""
    k = config["explanations"]["figures"]["k"]
    return int(k if k is not None else config["clustering"]["k"][0])


def resources(config: Mapping[str, Any], job: str, model: str, dataset: str, site: str) -> dict[str, int]:
    """mem_mb and runtime (minutes) of a cluster job, estimated from the config before anything runs."""
    from . import resources as nares

    shape = nares.shape_of(config["models"], model)
    n = shape.neurons(site)
    spec, dspec = config["models"][model], config["datasets"][dataset]
    tokens = nares.shard_tokens(dspec, spec) * max(1, dspec["shards"] - len(dspec["eval_shards"]))
    t = nares.distinct_ids(tokens, shape.vocab)
    rep_mb = n * t * 4 / 2**20
    clu = config["clustering"]
    exact = clu["method"] == "exact" or (clu["method"] == "auto" and n <= clu["exact_max_neurons"])
    if job == "representation":
        per_layer = t * shape.d_ff * 8 * 2 / 2**20
        mem, minutes = 800 + 2.2 * rep_mb + per_layer, 10 + rep_mb / 200
    elif job == "tree":
        cond = 4 * n * n / 2**20 if exact else 0
        mem = 800 + 2.2 * rep_mb + cond + (0 if exact else 8 * clu["centroids"]["n"] ** 2 / 2**20)
        flops = n * n * t if exact else 2 * n * clu["centroids"]["n"] * clu["centroids"]["projection_dims"] * clu["centroids"]["iterations"]
        minutes = 10 + flops / 5e10 / 60 + (n * n / 2e7 / 60 if exact else 0)
    elif job == "sweep":
        mem, minutes = 800 + 3.2 * rep_mb, 10 + len(clu["sweep_k"]) * rep_mb / 300
    elif job in ("refine", "explain", "figures", "bootstrap"):
        mem, minutes = 800 + 2.2 * rep_mb, 10 + rep_mb / 300
        if job == "bootstrap":
            mem += 4 * n * n / 2**20 if exact else 0
            minutes *= 2 * clu["bootstrap"]["replicates"]
    else:  # cut and small table jobs
        mem, minutes = 800, 10
    return {"mem_mb": int(mem), "runtime": int(math.ceil(minutes))}


# ----------------------------------------------------------------------------- jobs


def representation_job(variant: str, inputs: Mapping[str, str], output: str, params: Mapping[str, Any]) -> None:
    """Rule cluster_representation: one representation variant (raw from stats.h5, the others from theirs)."""
    if variant == "raw":
        rep = rp.raw_from_store(inputs["stats"], read_json(inputs["manifest"]))
        print(f"raw: {rep.attrs['n_tokens_seen']} token ids seen, {rep.attrs['n_special_dropped']} special dropped "
              f"({', '.join(rep.attrs['special_dropped'][:12])}), {len(rep.tokens)} kept")
    else:
        src = rp.read(inputs["source"])
        if variant == "filter":
            rep = rp.frequency_filter(src, int(params["min_count"]))
            print(f"filter: min_count {params['min_count']}: {rep.attrs['n_tokens_after_filter']} of "
                  f"{rep.attrs['n_tokens_before_filter']} tokens kept")
        elif variant == "tfidf":
            rep = rp.tfidf_representation(src, params["negative"])
        elif variant == "smooth":
            from . import vectors

            rep = rp.smooth_representation(src, vectors.load(params["vectors"]), int(params["neighbors"]), float(params["lambda"]))
            print(f"smooth: {rep.attrs['n_tokens_without_vector']} of {len(rep.tokens)} tokens have no vector (left unchanged)")
        else:
            raise NeuronAtlasError(f"unknown representation variant {variant!r}; allowed: {', '.join(rp.VARIANTS)}")
    rep.attrs["variant"] = variant
    rep.attrs["params"] = dict(params)
    rep.attrs["config_hash"] = config_hash(dict(params))
    rp.write(output, rep)
    print(f"{variant}: {rep.n_neurons} neurons x {len(rep.tokens)} tokens -> {output}")


def tree_job(rep_path: str, output: str, params: Mapping[str, Any]) -> None:
    """Rule cluster_tree: the agglomerative tree of one representation (exact or via centroids)."""
    rep = rp.read(rep_path)
    n = rep.n_neurons
    method = cl.resolve_method(params["method"], n, int(params.get("exact_max_neurons", n)))
    c = params.get("centroids") or {}
    print(f"{rep.attrs.get('model')}/{rep.attrs.get('dataset')}/{rep.attrs.get('site')}/{rep.attrs.get('variant')}: "
          f"{n} neurons x {len(rep.tokens)} tokens, method {method}, {params['linkage']} linkage")
    tree = cl.build_tree(rep.values, method, params["linkage"], n_centroids=int(c.get("n", 2048)),
                         kmeans_iter=int(c.get("iterations", 20)), projection_dims=c.get("projection_dims"),
                         seed=int(params.get("seed", 0)), progress=True, inplace=True)
    del rep.values
    tree.attrs.update({k: rep.attrs.get(k) for k in ("model", "dataset", "site", "variant")})
    tree.attrs.update(n_layers=rep.n_layers, width=rep.width, params=dict(params), config_hash=config_hash(dict(params)))
    cl.save_tree(output, tree)


def cut_job(tree_path: str, rep_path: str, k: int, output: str, csv_out: str, md_out: str, params: Mapping[str, Any]) -> None:
    """Rule cluster_cut: the tree cut at K clusters -> neuron_id, layer, index, cluster (Parquet), and the
    clusters' top tokens (CSV + markdown; params = the explanations settings)."""
    tree = cl.load_tree(tree_path)
    labels = cl.cut(tree, int(k))
    cols = cl.labels_table(labels, int(tree.attrs["width"]))
    meta = {k2: tree.attrs.get(k2) for k2 in ("model", "dataset", "site", "variant", "n_layers", "width")}
    meta.update(k=int(k), method=tree.method, linkage=tree.linkage, refined=False)
    cl.write_parquet(output, cols, meta)
    sizes = np.bincount(labels)
    print(f"K={k}: cluster sizes min {sizes.min()}, median {int(np.median(sizes))}, max {sizes.max()}")
    explain(rp.read(rep_path), cols, meta, csv_out, md_out, params)


def refine_job(rep_path: str, clusters_path: str, output: str, trace_output: str, csv_out: str, md_out: str,
               params: Mapping[str, Any]) -> None:
    """Rule cluster_refine: iterative refinement of every cluster (section 5.3), its trace, and the refined
    clusters' top tokens (params: threshold, explain)."""
    rep = rp.read(rep_path)
    cols = cl.read_parquet(clusters_path)
    meta = cl.parquet_metadata(clusters_path)
    labels = np.empty(rep.n_neurons, np.int64)
    labels[cols["neuron_id"]] = cols["cluster"]
    keep, trace = cl.refine(rep.values, labels, float(params["threshold"]))
    rows = np.flatnonzero(keep)
    meta.update(refined=True, refine_threshold=float(params["threshold"]))
    refined = cl.labels_table(labels, rep.width, rows)
    cl.write_parquet(output, refined, meta)
    cl.write_parquet(trace_output, trace, meta)
    sizes = np.bincount(labels[rows], minlength=int(meta["k"]))
    print(f"refined K={meta['k']}: {rows.size} of {rep.n_neurons} neurons kept; cluster sizes median {np.median(sizes):g}, "
          f"max {sizes.max()}, empty {int((sizes == 0).sum())}")
    explain(rep, refined, meta, csv_out, md_out, params["explain"])


def explain(rep: rp.Representation, cols: Mapping[str, np.ndarray], meta: Mapping[str, Any], csv_out: str, md_out: str,
            params: Mapping[str, Any]) -> None:
    """Top-N tokens per cluster of one clustering as CSV + markdown (Tables 1 and 4)."""
    k = int(meta["k"])
    rows = ex.top_tokens(rep, cols["neuron_id"], cols["cluster"], k, int(params["top_n"]), bool(params["normalize"]))
    ex.write_csv(csv_out, rows)
    layers: dict[int, list[int]] = {}
    for c, layer in zip(cols["cluster"], cols["layer"]):
        layers.setdefault(int(c), []).append(int(layer))
    suffix = f"-{meta['variant']}" + ("-refined" if meta.get("refined") else "")
    title = (f"Top-activating tokens: {meta['model']} / {meta['dataset']} / {meta['site']}, variant {meta['variant']}, "
             f"K = {k}{' (refined)' if meta.get('refined') else ''}")
    ex.write_text(md_out, ex.markdown(rows, title, str(meta["dataset"]), k, suffix, layers, int(params["markdown_tokens"])))
    print(f"explanations: {k} clusters x top {params['top_n']} tokens -> {csv_out}")


def sweep_job(reps: Mapping[str, str], trees: Mapping[str, str], output: str, params: Mapping[str, Any]) -> None:
    """Rule cluster_sweep: mean (over clusters) max and average within-cluster distance for every K of the
    sweep and every variant (section 6.1, Fig. 2). Single-member clusters have no pairwise distance: they are
    left out of the means and counted."""
    out = []
    for variant, path in reps.items():
        rep = rp.read(path)
        tree = cl.load_tree(trees[variant])
        X = rp.unit_rows(rep.values, inplace=True)
        del rep.values
        ks = sorted(int(k) for k in params["ks"] if k <= tree.n_leaves)
        for k in sorted(set(params["ks"]) - set(ks)):
            print(f"{variant}: K={k} skipped (more than the {tree.n_leaves} leaves of the tree)")
        labels = [cl.cut(tree, k) for k in ks]
        heights = [cl.cluster_heights(tree, k) for k in ks]
        if ks and heights[0] is None:  # not an exact complete-linkage tree: maxima from the members
            heights = cl.nested_max_distances(X, labels)
        for k, lab, h in zip(ks, labels, heights):
            w = cl.within_cluster_distances(X, lab, h)
            multi = w["size"] >= 2
            out.append({
                "variant": variant, "k": k, "mean_max_distance": float(np.nanmean(w["max_distance"])) if multi.any() else float("nan"),
                "mean_avg_distance": float(np.nanmean(w["avg_distance"])) if multi.any() else float("nan"),
                "clusters_with_2plus": int(multi.sum()), "singletons": int((~multi).sum()), "method": tree.method,
            })
            print(f"{variant} K={k}: mean max {out[-1]['mean_max_distance']:.3f}, mean avg {out[-1]['mean_avg_distance']:.3f}")
    write_rows(output, out, ["variant", "k", "mean_max_distance", "mean_avg_distance", "clusters_with_2plus", "singletons", "method"])


def figures_job(inputs: Mapping[str, str], outputs: Mapping[str, str], params: Mapping[str, Any]) -> None:
    """Rule cluster_figures: Figs. 1, 2, 3, 5 of one (model, dataset, site)."""
    from .plots import clusters as pc

    who = params["label"]
    k = int(params["k"])
    # Fig. 1
    trace = cl.read_parquet(inputs["trace"])
    pc.refinement_curves(trace, outputs["fig1"], float(params["threshold"]), int(params["refinement_clusters"]), int(params["seed"]),
                         f"Refinement: {who}, {params['refinement_variant']}, K = {k}")
    # Fig. 2
    pc.distance_vs_k(read_rows(inputs["sweep"]), outputs["fig2"], f"Within-cluster distance vs K: {who}")
    # Fig. 3
    from . import vectors

    vec = vectors.load(params["vectors"])
    rows = ex.read_csv(inputs["explanations"])
    groups = embedding_groups(rows, vec, int(params["embedding_tokens"]), int(params["embedding_clusters"]))
    pc.token_embeddings(groups, outputs["fig3"],
                        f"Top-{params['embedding_tokens']} token vectors ({vec.name}, PCA), {len(groups)} most compact clusters: "
                        f"{who}, {params['embedding_variant']}, K = {k}")
    # Fig. 5
    cols = cl.read_parquet(inputs["clusters"])
    meta = cl.parquet_metadata(inputs["clusters"])
    sizes = np.bincount(cols["cluster"])
    cand = np.flatnonzero(sizes >= 3)
    rng = np.random.default_rng(int(params["seed"]))
    pick = sorted(int(c) for c in rng.choice(cand, size=min(int(params["position_clusters"]), cand.size), replace=False)) if cand.size else []
    shared = cl.index_shared(cols["cluster"], cols["index"])
    shares = {c: float(shared[cols["cluster"] == c].mean()) for c in pick}
    pc.neuron_positions(cols["layer"], cols["index"], cols["cluster"], pick, int(meta["n_layers"]), int(meta["width"]), outputs["fig5"],
                        f"Neuron positions: {who}, {params['positions_variant']}, K = {k}", shares)


def embedding_groups(rows: Sequence[Mapping[str, Any]], vec: Any, n_tokens: int, n_clusters: int, min_vectors: int = 5) -> dict[int, tuple[list[str], np.ndarray]]:
    """The `n_clusters` clusters whose top-`n_tokens` token vectors are most compact (smallest mean pairwise
    cosine distance; clusters with fewer than `min_vectors` tokens with a vector are skipped)."""
    by: dict[int, list[Mapping[str, Any]]] = {}
    for r in rows:
        if int(r["rank"]) <= n_tokens:
            by.setdefault(int(r["cluster"]), []).append(r)
    scored = []
    for c, rs in by.items():
        keys = [rp.vector_key(r["text"], r["token"]) for r in rs]
        mat, found = vec.lookup(keys)
        if found.sum() < min_vectors:
            continue
        V = rp.unit_rows(mat[found])
        m = V.shape[0]
        s = V.sum(axis=0)
        mean_dist = 1.0 - (float(s @ s) - m) / (m * (m - 1))
        scored.append((mean_dist, c, [r["token"] for r, f in zip(rs, found) if f], mat[found]))
    scored.sort(key=lambda x: (x[0], x[1]))
    return {c: (toks, m) for _, c, toks, m in scored[:n_clusters]}


def bootstrap_job(shards: Sequence[str], manifest: str, references: Mapping[int, str], output: str, params: Mapping[str, Any]) -> None:
    """Rule cluster_bootstrap: re-cluster representations of bootstrap-resampled shard sets; ARI vs the full data."""
    from . import vectors

    rng = np.random.default_rng(int(params["seed"]))
    man = read_json(manifest)
    ref = {int(k): cl.read_parquet(p) for k, p in references.items()}
    out = []
    vec = vectors.load(params["representation"]["vectors"]) if params["variant"] == "smooth" else None
    for b in range(int(params["replicates"])):
        pick = sorted(int(i) for i in rng.integers(0, len(shards), size=len(shards)))
        rep = rp.raw_from_store([shards[i] for i in pick], man, progress=False)
        if params["variant"] != "raw":
            rep = rp.frequency_filter(rep, int(params["min_count"]))
        if params["variant"] == "tfidf":
            rep = rp.tfidf_representation(rep, params["representation"]["negative"])
        elif params["variant"] == "smooth":
            r = params["representation"]
            rep = rp.smooth_representation(rep, vec, int(r["neighbors"]), float(r["lambda"]))
        tp = params["tree"]
        method = cl.resolve_method(tp["method"], rep.n_neurons, int(tp.get("exact_max_neurons", rep.n_neurons)))
        c = tp.get("centroids") or {}
        tree = cl.build_tree(rep.values, method, tp["linkage"], int(c.get("n", 2048)), int(c.get("iterations", 20)),
                             c.get("projection_dims"), int(tp.get("seed", 0)) + 1 + b, inplace=True)
        names = [Path(shards[i]).stem for i in pick]
        for k, cols in ref.items():
            labels_ref = np.empty(rep.n_neurons, np.int64)
            labels_ref[cols["neuron_id"]] = cols["cluster"]
            ari = cl.adjusted_rand_index(labels_ref, cl.cut(tree, k))
            out.append({"replicate": b, "shards": " ".join(names), "k": k, "ari": ari, "tokens": len(rep.tokens)})
            print(f"replicate {b} ({' '.join(names)}): K={k} ARI {ari:.3f}")
    write_rows(output, out, ["replicate", "shards", "k", "ari", "tokens"])


def tables_job(inputs: Mapping[str, Any], outputs: Mapping[str, str], params: Mapping[str, Any]) -> None:
    """Rule cluster_tables: method-wide tables (CSV + markdown): tokens kept, refinement, within-cluster
    distances, index clustering (section 7.3 quantified) and stability (ARI between variants, bootstrap)."""
    triples = params["triples"]
    ks, variants = params["ks"], params["variants"]
    seed, n_random = int(params["seed"]), int(params["index_random"])
    tok_rows, ref_rows, idx_rows, stab_rows, dist_rows = [], [], [], [], []
    for t in triples:
        m, d, s = t["model"], t["dataset"], t["site"]
        key = f"{m}/{d}/{s}"
        reps = {v: rp.read(inputs["reps"][key][v], values=False) for v in variants}
        base = reps.get("raw") or next(iter(reps.values()))
        row = {"model": m, "dataset": d, "site": s, "neurons": base.n_neurons}
        if "raw" in reps:
            row.update(tokens_seen=reps["raw"].attrs.get("n_tokens_seen"), special_dropped=reps["raw"].attrs.get("n_special_dropped"),
                       tokens_raw=len(reps["raw"].tokens))
        if "filter" in reps:
            a = reps["filter"].attrs
            row.update(min_count=a.get("min_count"), tokens_filter=len(reps["filter"].tokens),
                       kept_share_of_vocab=round(len(reps["filter"].tokens) / max(1, int(read_json(inputs["manifests"][m])["vocab_size"])), 4))
        if "smooth" in reps:
            row.update(tokens_without_vector=reps["smooth"].attrs.get("n_tokens_without_vector"))
        tok_rows.append(row)
        n_total = base.n_neurons
        all_index = np.tile(np.arange(base.width, dtype=np.int64), base.n_layers)
        labels_by = {}
        for v in variants:
            for k in ks:
                full = cl.read_parquet(inputs["clusters"][key][v][str(k)])
                refd = cl.read_parquet(inputs["refined"][key][v][str(k)])
                labels_by[(v, k)] = full
                for refined, cols in ((False, full), (True, refd)):
                    st = cl.index_clustering(cols["cluster"], cols["index"], n_total, all_index, n_random, seed)
                    idx_rows.append({"model": m, "dataset": d, "site": s, "variant": v, "k": k, "refined": refined,
                                     "neurons": int(cols["cluster"].size), **{kk: round(vv, 4) for kk, vv in st.items()}})
                sizes = np.bincount(refd["cluster"], minlength=k)
                ref_rows.append({"model": m, "dataset": d, "site": s, "variant": v, "k": k, "neurons": n_total,
                                 "neurons_refined": int(refd["cluster"].size), "mean_size_refined": round(float(sizes.mean()), 2),
                                 "median_size_refined": float(np.median(sizes)), "singleton_clusters": int((sizes == 1).sum())})
        for k in ks:
            for i, a in enumerate(variants):
                for b in variants[i + 1 :]:
                    la, lb = labels_by[(a, k)], labels_by[(b, k)]
                    stab_rows.append({"model": m, "dataset": d, "site": s, "k": k, "comparison": f"{a} vs {b}",
                                      "ari": round(cl.adjusted_rand_index(la["cluster"], lb["cluster"]), 4), "n": 1})
        for r in read_rows(inputs["sweeps"][key]):
            dist_rows.append({"model": m, "dataset": d, "site": s, **r})
        if inputs.get("bootstrap", {}).get(key):
            boot = read_rows(inputs["bootstrap"][key])
            for k in ks:
                vals = [float(r["ari"]) for r in boot if int(r["k"]) == k]
                if vals:
                    stab_rows.append({"model": m, "dataset": d, "site": s, "k": k,
                                      "comparison": f"bootstrap shards ({params['bootstrap_variant']})",
                                      "ari": round(float(np.mean(vals)), 4), "n": len(vals)})
    specs = [
        ("tokens", tok_rows, "Tokens per representation (raw: after dropping special tokens; filter: after the frequency threshold)"),
        ("refinement", ref_rows, "Refinement (section 5.3): neurons surviving, cluster sizes after refinement"),
        ("within_distance", dist_rows, "Within-cluster distances vs K (section 6.1, Fig. 2): means over clusters with 2+ neurons"),
        ("index_clustering", idx_rows, "Index clustering (section 7.3): share of clustered neurons that share an index position with "
         "a cluster mate in another layer, vs random clusters of the same sizes"),
        ("stability", stab_rows, "Stability: adjusted Rand index between variants (same K), and between the full-data clustering and "
         "clusterings of bootstrap-resampled shard sets (mean over replicates)"),
    ]
    for name, rows, caption in specs:
        cols = list(dict.fromkeys(c for r in rows for c in r)) or ["empty"]
        write_rows(outputs[f"{name}_csv"], rows, cols)
        write_markdown_table(outputs[f"{name}_md"], rows, cols, caption)


# ----------------------------------------------------------------------------- small table IO


def write_rows(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Write dict rows as CSV atomically."""
    with atomic_path(path, suffix=".csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: (f"{r[c]:.6g}" if isinstance(r.get(c), float) else r.get(c, "")) for c in columns})


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """Read a CSV as dict rows (strings)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def write_markdown_table(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str], caption: str) -> None:
    """Write rows as a markdown table with a caption line."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4g}"
        return "" if v is None else str(v)

    lines = [caption, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    ex.write_text(path, "\n".join(lines))
