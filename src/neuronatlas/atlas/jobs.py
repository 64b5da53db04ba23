"""Jobs of the neuron atlas (workflow/rules/atlas.smk): one function per rule.

workflow/scripts/<rule>.py call these with what Snakemake hands them; tests call them directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from neuronatlas.core.errors import NeuronAtlasError


def atlas_examples(
    model: str, dataset: str, manifest: str, shards_dir: str, stats: Mapping[str, str], out: str, params: Mapping[str, Any]
) -> dict[str, Any]:
    """Rule atlas_examples: every atlas site's top examples of one (model, dataset) with the activations around their maxima."""
    from neuronatlas.atlas import examples
    from neuronatlas.core.corpus import shard_files
    from neuronatlas.core.models import load
    from neuronatlas.core.store import open_store
    from neuronatlas.n2g.build import DocumentTokens

    lm = load(manifest, params["device"], params["dtype"], params.get("threads"))
    if lm.family.kind == "image":
        raise NeuronAtlasError(f"model {model!r} is an image model; the atlas shows text examples only (leave it out of atlas.models)")
    selections = []
    for site in params["sites"]:
        with open_store(stats[site]) as st:
            if st.attrs.get("site") != site:
                raise NeuronAtlasError(f"{stats[site]} holds site {st.attrs.get('site')!r}, expected {site!r}")
            selections.append(examples.select(st, site, params["layers"], params["max_neurons"], params["examples"], params["seed"]))
    man = lm.manifest
    docs = DocumentTokens(
        lm.tokenizer, shard_files(shards_dir, params["stats_shards"]), params["max_length"], man["prefix_ids"], man["suffix_ids"]
    )
    strings, info = examples.recompute(lm, docs, selections, params["context"], params["batch_tokens"], params["max_batch_size"])
    neurons = sum(len(s.neurons) for s in selections)
    print(
        f"{model}/{dataset}: {neurons} neurons of {len(selections)} site(s), {info['windows']} distinct windows in {info['batches']} "
        f"batches ({info['forward_tokens']} padded tokens) in {info['seconds']:.1f}s; largest key-activation difference "
        + ", ".join(f"{s.site} {s.key_error:.2e}" for s in selections)
    )
    attrs = {"model": model, "dataset": dataset, "context": params["context"], "examples": params["examples"], "windows": info["windows"]}
    examples.write(out, selections, strings, attrs)
    return info


def atlas_site(inputs: Mapping[str, Any], out_dir: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Rule atlas_site: the data chunks of one (model, dataset, site)."""
    from neuronatlas.atlas import build

    summary = build.build_site(inputs, out_dir, params)
    print(
        f"{summary['key']}: {summary['files']} files, {summary['bytes'] / 2**20:.2f} MiB; "
        f"{summary['neurons_with_examples']} neurons with examples of {summary['n_layers'] * summary['width']}"
    )
    return summary


def atlas_index(inputs: Mapping[str, Any], outputs: Mapping[str, str], params: Mapping[str, Any]) -> dict[str, Any]:
    """Rule atlas_index: the page (app inlined) and the index of every site and the replication verdicts."""
    from neuronatlas.atlas import build

    index = build.build_index(inputs, outputs, params)
    print(f"atlas: {len(index['sites'])} site(s), {index['bytes'] / 2**20:.2f} MiB in all; open {outputs['html']}")
    return index
