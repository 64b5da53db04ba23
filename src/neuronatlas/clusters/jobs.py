"""Jobs of the neuron-cluster method (workflow/rules/clusters.smk; Zhang, Gu & Yao): one function per rule.

workflow/scripts/<rule>.py call these with what Snakemake hands them; tests call them directly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neuronatlas.clusters import clustering, explanations, representations
from neuronatlas.core import tables
from neuronatlas.core.errors import NeuronAtlasError
from neuronatlas.core.io import config_hash, read_json


def clusters_representation(variant: str, inputs: Mapping[str, str], output: str, params: Mapping[str, Any]) -> None:
    """Rule clusters_representation: one variant's token columns and recipe (raw from stats.h5, the others
    from their source variant); the values are recomputed from stats.h5 by whoever reads it."""
    if variant == "raw":
        rep = representations.raw_from_store(inputs["stats"], read_json(inputs["manifest"]), progress=False, values=False)
        print(
            f"raw: {rep.attrs['n_tokens_seen']} token ids seen, {rep.attrs['n_special_dropped']} special dropped "
            f"({', '.join(rep.attrs['special_dropped'][:12])}), {len(rep.tokens)} kept"
        )
    else:
        source = representations.read(inputs["source"], values=False)
        if variant == "filter":
            rep = representations.frequency_filter(source, int(params["min_count"]))
            print(
                f"filter: min_count {params['min_count']}: {rep.attrs['n_tokens_after_filter']} of "
                f"{rep.attrs['n_tokens_before_filter']} tokens kept"
            )
        elif variant == "tfidf":
            # params hold a quantile only under the quantile reading; positive ignores the argument
            rep = representations.tfidf_representation(
                source, params["negative"], params["document_frequency"], float(params.get("quantile", 0.9))
            )
        elif variant == "smooth":
            from neuronatlas.clusters import vectors

            rep = representations.smooth_representation(
                source, vectors.load(params["vectors"]), int(params["neighbors"]), float(params["lambda"])
            )
            print(f"smooth: {rep.attrs['n_tokens_without_vector']} of {len(rep.tokens)} tokens have no vector (left unchanged)")
        else:
            raise NeuronAtlasError(f"unknown representation variant {variant!r}; allowed: {', '.join(representations.VARIANTS)}")
    rep.attrs["variant"] = variant
    rep.attrs["params"] = dict(params)
    rep.attrs["config_hash"] = config_hash(dict(params))
    representations.write(output, rep)
    print(f"{variant}: {rep.n_neurons} neurons x {len(rep.tokens)} tokens -> {output}")


def clusters_tree(representation: str, stats: str, output: str, params: Mapping[str, Any]) -> None:
    """Rule clusters_tree: the agglomerative tree of one representation (exact or via centroids)."""
    rep = representations.read(representation, stats)
    n = rep.n_neurons
    method = clustering.resolve_method(params["method"], n, int(params.get("exact_max_neurons", n)))
    centroids = params.get("centroids") or {}
    print(
        f"{rep.attrs.get('model')}/{rep.attrs.get('dataset')}/{rep.attrs.get('site')}/{rep.attrs.get('variant')}: "
        f"{n} neurons x {len(rep.tokens)} tokens, method {method}, {params['linkage']} linkage"
    )
    tree = clustering.build_tree(
        rep.values,
        method,
        params["linkage"],
        n_centroids=int(centroids.get("n", 2048)),
        kmeans_iter=int(centroids.get("iterations", 20)),
        projection_dims=centroids.get("projection_dims"),
        seed=int(params.get("seed", 0)),
        progress=True,
        inplace=True,
    )
    del rep.values
    tree.attrs.update({k: rep.attrs.get(k) for k in ("model", "dataset", "site", "variant")})
    tree.attrs.update(n_layers=rep.n_layers, width=rep.width, params=dict(params), config_hash=config_hash(dict(params)))
    clustering.save_tree(output, tree)


def clusters_cut(tree_path: str, representation: str, stats: str, outputs: Mapping[str, str], params: Mapping[str, Any]) -> None:
    """Rule clusters_cut: for every K, the tree cut at K clusters, its refinement (section 5.3) with the trace,
    and the top tokens of both (outputs named as clusters.dag.cut_outputs)."""
    tree = clustering.load_tree(tree_path)
    rep = representations.read(representation, stats)
    cuts: dict[int, np.ndarray] = {}
    for k in params["ks"]:
        k = int(k)
        labels = cuts[k] = clustering.cut(tree, k)
        cols = clustering.labels_table(labels, int(tree.attrs["width"]))
        meta = {key: tree.attrs.get(key) for key in ("model", "dataset", "site", "variant", "n_layers", "width")}
        meta.update(k=k, method=tree.method, linkage=tree.linkage, refined=False)
        clustering.write_parquet(outputs[f"clusters_k{k}"], cols, meta)
        sizes = np.bincount(labels)
        print(f"K={k}: cluster sizes min {sizes.min()}, median {int(np.median(sizes))}, max {sizes.max()}")
        explain(rep, cols, meta, outputs[f"explanations_k{k}"], outputs[f"markdown_k{k}"], params["explain"])
        keep, trace = clustering.refine(rep.values, labels, float(params["threshold"]))
        rows = np.flatnonzero(keep)
        meta.update(refined=True, refine_threshold=float(params["threshold"]))
        refined = clustering.labels_table(labels, rep.width, rows)
        clustering.write_parquet(outputs[f"refined_k{k}"], refined, meta)
        clustering.write_parquet(outputs[f"trace_k{k}"], trace, meta)
        kept = np.bincount(labels[rows], minlength=k)
        print(
            f"refined K={k}: {rows.size} of {rep.n_neurons} neurons kept; cluster sizes median {np.median(kept):g}, "
            f"max {kept.max()}, empty {int((kept == 0).sum())}"
        )
        explain(rep, refined, meta, outputs[f"explanations_refined_k{k}"], outputs[f"markdown_refined_k{k}"], params["explain"])
    write_cluster_distances(tree, rep, cuts, outputs)


def write_cluster_distances(
    tree: clustering.Tree, rep: representations.Representation, cuts: Mapping[int, np.ndarray], outputs: Mapping[str, str]
) -> None:
    """Every cluster's size, max and average within-cluster distance at each K -> outputs["distances_k<K>"] (the
    units of the replication report's intervals). Consumes rep.values (normalised in place)."""
    X = representations.unit_rows(rep.values, inplace=True)
    ks = sorted(cuts)
    heights = [clustering.cluster_heights(tree, k) for k in ks]
    if ks and heights[0] is None:  # not an exact complete-linkage tree: maxima from the members
        heights = clustering.nested_max_distances(X, [cuts[k] for k in ks])
    for k, h in zip(ks, heights):
        w = clustering.within_cluster_distances(X, cuts[k], h)
        rows = [
            {"cluster": c, "size": int(size), "max_distance": float(high), "avg_distance": float(mean)}
            for c, (size, high, mean) in enumerate(zip(w["size"], w["max_distance"], w["avg_distance"]))
        ]
        tables.write_csv(outputs[f"distances_k{k}"], rows, DISTANCE_COLUMNS)


DISTANCE_COLUMNS = ["cluster", "size", "max_distance", "avg_distance"]


def explain(
    rep: representations.Representation,
    cols: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    csv_out: str,
    md_out: str,
    params: Mapping[str, Any],
) -> None:
    """Top-N tokens per cluster of one clustering as CSV + markdown (Tables 1 and 4)."""
    k = int(meta["k"])
    rows = explanations.top_tokens(rep, cols["neuron_id"], cols["cluster"], k, int(params["top_n"]), bool(params["normalize"]))
    tables.write_csv(csv_out, rows, explanations.COLUMNS)
    layers: dict[int, list[int]] = {}
    for c, layer in zip(cols["cluster"], cols["layer"]):
        layers.setdefault(int(c), []).append(int(layer))
    suffix = f"-{meta['variant']}" + ("-refined" if meta.get("refined") else "")
    title = (
        f"Top-activating tokens: {meta['model']} / {meta['dataset']} / {meta['site']}, variant {meta['variant']}, "
        f"K = {k}{' (refined)' if meta.get('refined') else ''}"
    )
    tables.write_text(md_out, explanations.markdown(rows, title, str(meta["dataset"]), k, suffix, layers, int(params["markdown_tokens"])))
    print(f"explanations: {k} clusters x top {params['top_n']} tokens -> {csv_out}")


def clusters_sweep(
    representation_files: Mapping[str, str], stats: str, trees: Mapping[str, str], outputs: Mapping[str, str], params: Mapping[str, Any]
) -> None:
    """Rule clusters_sweep: mean (over clusters) max and average within-cluster distance for every K of the
    sweep and every variant (section 6.1, Fig. 2) -> outputs["summary"].
    Single-member clusters have no pairwise distance: they are left out of the means and counted."""
    summary = []
    for variant, path in representation_files.items():
        rep = representations.read(path, stats)
        tree = clustering.load_tree(trees[variant])
        X = representations.unit_rows(rep.values, inplace=True)
        del rep.values
        ks = sorted(int(k) for k in params["ks"] if int(k) <= tree.n_leaves)
        skipped = sorted(int(k) for k in params["ks"] if int(k) > tree.n_leaves)
        if skipped:
            print(f"{variant}: K={skipped} skipped (more than the {tree.n_leaves} leaves of the tree)")
        labels = [clustering.cut(tree, k) for k in ks]
        heights = [clustering.cluster_heights(tree, k) for k in ks]
        if ks and heights[0] is None:  # not an exact complete-linkage tree: maxima from the members
            heights = clustering.nested_max_distances(X, labels)
        for k, lab, h in zip(ks, labels, heights):
            w = clustering.within_cluster_distances(X, lab, h)
            multi = w["size"] >= 2
            summary.append(
                {
                    "variant": variant,
                    "k": k,
                    "mean_max_distance": float(np.nanmean(w["max_distance"])) if multi.any() else float("nan"),
                    "mean_avg_distance": float(np.nanmean(w["avg_distance"])) if multi.any() else float("nan"),
                    "clusters_with_2plus": int(multi.sum()),
                    "singletons": int((~multi).sum()),
                    "method": tree.method,
                }
            )
            print(f"{variant} K={k}: mean max {summary[-1]['mean_max_distance']:.3f}, mean avg {summary[-1]['mean_avg_distance']:.3f}")
    columns = ["variant", "k", "mean_max_distance", "mean_avg_distance", "clusters_with_2plus", "singletons", "method"]
    tables.write_csv(outputs["summary"], summary, columns)


def clusters_figures(inputs: Mapping[str, str], outputs: Mapping[str, str], params: Mapping[str, Any]) -> None:
    """Rule clusters_figures: Figs. 1, 2, 3, 5 of one (model, dataset, site)."""
    from neuronatlas.clusters import figures, vectors

    who, k = params["label"], int(params["k"])
    trace = clustering.read_parquet(inputs["trace"])
    figures.refinement_curves(
        trace,
        outputs["fig1"],
        float(params["threshold"]),
        int(params["refinement_clusters"]),
        int(params["seed"]),
        f"Refinement: {who}, {params['refinement_variant']}, K = {k}",
    )
    figures.distance_vs_k(tables.read_rows(inputs["sweep"]), outputs["fig2"], f"Within-cluster distance vs K: {who}")
    vec = vectors.load(params["vectors"])
    groups = embedding_groups(
        explanations.read_csv(inputs["explanations"]), vec, int(params["embedding_tokens"]), int(params["embedding_clusters"])
    )
    figures.token_embeddings(
        groups,
        outputs["fig3"],
        f"Top-{params['embedding_tokens']} token vectors ({vec.name}, PCA), {len(groups)} most compact clusters: "
        f"{who}, {params['embedding_variant']}, K = {k}",
    )
    cols = clustering.read_parquet(inputs["clusters"])
    meta = clustering.parquet_metadata(inputs["clusters"])
    sizes = np.bincount(cols["cluster"])
    candidates = np.flatnonzero(sizes >= 3)
    rng = np.random.default_rng(int(params["seed"]))
    pick = (
        sorted(int(c) for c in rng.choice(candidates, size=min(int(params["position_clusters"]), candidates.size), replace=False))
        if candidates.size
        else []
    )
    shared = clustering.index_shared(cols["cluster"], cols["index"])
    shares = {c: float(shared[cols["cluster"] == c].mean()) for c in pick}
    figures.neuron_positions(
        cols["layer"],
        cols["index"],
        cols["cluster"],
        pick,
        int(meta["n_layers"]),
        int(meta["width"]),
        outputs["fig5"],
        f"Neuron positions: {who}, {params['positions_variant']}, K = {k}",
        shares,
    )


def embedding_groups(
    rows: Sequence[Mapping[str, Any]], vec: Any, n_tokens: int, n_clusters: int, min_vectors: int = 5
) -> dict[int, tuple[list[str], np.ndarray]]:
    """The `n_clusters` clusters whose top-`n_tokens` token vectors are most compact (smallest mean pairwise
    cosine distance; clusters with fewer than `min_vectors` tokens with a vector are skipped)."""
    by: dict[int, list[Mapping[str, Any]]] = {}
    for r in rows:
        if int(r["rank"]) <= n_tokens:
            by.setdefault(int(r["cluster"]), []).append(r)
    scored = []
    for c, rs in by.items():
        keys = [representations.vector_key(r["text"], r["token"]) for r in rs]
        mat, found = vec.lookup(keys)
        if found.sum() < min_vectors:
            continue
        V = representations.unit_rows(mat[found])
        m = V.shape[0]
        s = V.sum(axis=0)
        mean_dist = 1.0 - (float(s @ s) - m) / (m * (m - 1))
        scored.append((mean_dist, c, [r["token"] for r, f in zip(rs, found) if f], mat[found]))
    scored.sort(key=lambda x: (x[0], x[1]))
    return {c: (toks, m) for _, c, toks, m in scored[:n_clusters]}


def clusters_bootstrap(
    shards: Sequence[str], site: str, manifest: str, references: Mapping[int, str], output: str, params: Mapping[str, Any]
) -> None:
    """Rule clusters_bootstrap: re-cluster representations of bootstrap-resampled shard sets; ARI vs the full data."""
    from neuronatlas.clusters import vectors

    rng = np.random.default_rng(int(params["seed"]))
    man = read_json(manifest)
    ref = {int(k): clustering.read_parquet(p) for k, p in references.items()}
    out = []
    vec = vectors.load(params["representation"]["vectors"]) if params["variant"] == "smooth" else None
    for b in range(int(params["replicates"])):
        pick = sorted(int(i) for i in rng.integers(0, len(shards), size=len(shards)))
        rep = representations.raw_from_store([shards[i] for i in pick], man, progress=False, site=site)
        if params["variant"] != "raw":
            rep = representations.frequency_filter(rep, int(params["min_count"]))
        if params["variant"] == "tfidf":
            r = params["representation"]
            rep = representations.tfidf_representation(rep, r["negative"], r["document_frequency"], float(r.get("quantile", 0.9)))
        elif params["variant"] == "smooth":
            r = params["representation"]
            rep = representations.smooth_representation(rep, vec, int(r["neighbors"]), float(r["lambda"]))
        tp = params["tree"]
        method = clustering.resolve_method(tp["method"], rep.n_neurons, int(tp.get("exact_max_neurons", rep.n_neurons)))
        c = tp.get("centroids") or {}
        tree = clustering.build_tree(
            rep.values,
            method,
            tp["linkage"],
            int(c.get("n", 2048)),
            int(c.get("iterations", 20)),
            c.get("projection_dims"),
            int(tp.get("seed", 0)) + 1 + b,
            inplace=True,
        )
        names = [Path(shards[i]).stem for i in pick]
        for k, cols in ref.items():
            labels_ref = np.empty(rep.n_neurons, np.int64)
            labels_ref[cols["neuron_id"]] = cols["cluster"]
            ari = clustering.adjusted_rand_index(labels_ref, clustering.cut(tree, k))
            out.append({"replicate": b, "shards": " ".join(names), "k": k, "ari": ari, "tokens": len(rep.tokens)})
            print(f"replicate {b} ({' '.join(names)}): K={k} ARI {ari:.3f}")
    tables.write_csv(output, out, ["replicate", "shards", "k", "ari", "tokens"])


def clusters_tables(inputs: Mapping[str, Any], outputs: Mapping[str, str], params: Mapping[str, Any]) -> None:
    """Rule clusters_tables: method-wide tables (CSV + markdown): tokens kept, refinement, within-cluster
    distances, index clustering (section 7.3 quantified) and stability (ARI between variants, bootstrap)."""
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in CAPTIONS}
    for triple in params["triples"]:
        key = "/".join(triple[part] for part in ("model", "dataset", "site"))
        reps = {v: representations.read(inputs["representations"][key][v], values=False) for v in params["variants"]}
        vocab = int(read_json(inputs["manifests"][triple["model"]])["vocab_size"])
        rows["tokens"].append(_token_row(triple, reps, vocab))
        clusterings = {
            (v, k): (
                clustering.read_parquet(inputs["clusters"][key][v][str(k)]),
                clustering.read_parquet(inputs["refined"][key][v][str(k)]),
            )
            for v in params["variants"]
            for k in params["ks"]
        }
        base = next(iter(reps.values()))
        for (v, k), (full, refined) in clusterings.items():
            rows["index_clustering"] += _index_rows(triple, v, k, full, refined, base, int(params["index_random"]), int(params["seed"]))
            rows["refinement"].append(_refinement_row(triple, v, k, refined, base.n_neurons, base.n_layers))
        rows["stability"] += _stability_rows(triple, clusterings, params)
        if inputs.get("bootstrap", {}).get(key):
            rows["stability"] += _bootstrap_rows(triple, tables.read_rows(inputs["bootstrap"][key]), params)
        rows["within_distance"] += [{**triple, **r} for r in tables.read_rows(inputs["sweeps"][key])]
    for name, caption in CAPTIONS.items():
        columns = list(dict.fromkeys(c for r in rows[name] for c in r)) or ["empty"]
        tables.write_both(outputs[f"{name}_csv"], outputs[f"{name}_md"], rows[name], caption, columns)


CAPTIONS = {
    "tokens": "Tokens per representation (raw: after dropping special tokens; filter: after the frequency threshold)",
    "refinement": "Refinement (section 5.3): neurons surviving, cluster sizes after refinement, and how many distinct "
    "index positions the refined clusters with 2+ neurons span (single_index_clusters: all members at one index "
    "across layers, so at most `layers` neurons; single_index_share: their share; median_distinct_indices). Distinct "
    "indices are counted on sites whose index is one coordinate in every layer (residual, ffn_out); on mlp an index "
    "names a different unit in every layer, so those columns are empty",
    "within_distance": "Within-cluster distances vs K (section 6.1, Fig. 2): means over clusters with 2+ neurons",
    "index_clustering": "Index clustering (section 7.3): share of clustered neurons that share an index position with "
    "a cluster mate in another layer, vs random clusters of the same sizes",
    "stability": "Stability: adjusted Rand index between variants (same K), and between the full-data clustering and "
    "clusterings of bootstrap-resampled shard sets (mean over replicates)",
}


def _token_row(triple: Mapping[str, str], reps: Mapping[str, representations.Representation], vocab: int) -> dict[str, Any]:
    """Tokens kept by each variant of one (model, dataset, site)."""
    base = reps.get("raw") or next(iter(reps.values()))
    row: dict[str, Any] = {**triple, "neurons": base.n_neurons}
    if "raw" in reps:
        attrs = reps["raw"].attrs
        row.update(
            tokens_seen=attrs.get("n_tokens_seen"), special_dropped=attrs.get("n_special_dropped"), tokens_raw=len(reps["raw"].tokens)
        )
    if "filter" in reps:
        row.update(
            min_count=reps["filter"].attrs.get("min_count"),
            tokens_filter=len(reps["filter"].tokens),
            kept_share_of_vocab=round(len(reps["filter"].tokens) / max(1, vocab), 4),
        )
    if "smooth" in reps:
        row.update(tokens_without_vector=reps["smooth"].attrs.get("n_tokens_without_vector"))
    return row


def _index_rows(
    triple: Mapping[str, str],
    variant: str,
    k: int,
    full: Mapping[str, np.ndarray],
    refined: Mapping[str, np.ndarray],
    base: representations.Representation,
    n_random: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Index clustering of one clustering and its refinement, against random clusters of the same sizes."""
    all_index = np.tile(np.arange(base.width, dtype=np.int64), base.n_layers)
    out = []
    for is_refined, cols in ((False, full), (True, refined)):
        found = clustering.index_clustering(cols["cluster"], cols["index"], base.n_neurons, all_index, n_random, seed)
        out.append(
            {
                **triple,
                "variant": variant,
                "k": k,
                "refined": is_refined,
                "neurons": int(cols["cluster"].size),
                **{name: round(value, 4) for name, value in found.items()},
            }
        )
    return out


def _refinement_row(
    triple: Mapping[str, str], variant: str, k: int, refined: Mapping[str, np.ndarray], n_total: int, n_layers: int
) -> dict[str, Any]:
    """Neurons surviving refinement, the refined cluster sizes and how many distinct indices the refined clusters span."""
    sizes = np.bincount(refined["cluster"], minlength=k)
    spread = clustering.single_index_summary(refined["cluster"], refined["index"], k)
    if triple["site"] not in clustering.SHARED_INDEX_SITES:  # an index names a different unit per layer: NaN, see CAPTIONS
        spread.update(single_index_clusters=float("nan"), single_index_share=float("nan"), median_distinct_indices=float("nan"))
    return {
        **triple,
        "variant": variant,
        "k": k,
        "neurons": n_total,
        "layers": n_layers,  # the most members a refined cluster at a single index can have
        "neurons_refined": int(refined["cluster"].size),
        "mean_size_refined": round(float(sizes.mean()), 2),
        "median_size_refined": float(np.median(sizes)),
        "singleton_clusters": int((sizes == 1).sum()),
        "clusters_2plus_refined": spread["clusters_2plus"],
        "single_index_clusters": spread["single_index_clusters"],
        "single_index_share": round(spread["single_index_share"], 4),
        "median_distinct_indices": spread["median_distinct_indices"],
    }


def _stability_rows(
    triple: Mapping[str, str], clusterings: Mapping[tuple[str, int], tuple[Any, Any]], params: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Adjusted Rand index between every pair of variants at the same K."""
    out = []
    for k in params["ks"]:
        for i, a in enumerate(params["variants"]):
            for b in params["variants"][i + 1 :]:
                ari = clustering.adjusted_rand_index(clusterings[(a, k)][0]["cluster"], clusterings[(b, k)][0]["cluster"])
                out.append({**triple, "k": k, "comparison": f"{a} vs {b}", "ari": round(ari, 4), "n": 1})
    return out


def _bootstrap_rows(triple: Mapping[str, str], boot: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Mean ARI of the bootstrap replicates against the full-data clustering, per K."""
    out = []
    for k in params["ks"]:
        values = [float(r["ari"]) for r in boot if int(r["k"]) == k]
        if values:
            out.append(
                {
                    **triple,
                    "k": k,
                    "comparison": f"bootstrap shards ({params['bootstrap_variant']})",
                    "ari": round(float(np.mean(values)), 4),
                    "n": len(values),
                }
            )
    return out
