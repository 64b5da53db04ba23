"""Extraction throughput vs a bare dense forward, and peak memory at 1x and 10x corpus size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from neuronatlas.bench import median, register, timed

DOCS_1X = 1000  # one demo shard of wiki summaries; 10x = the whole corpus (10,033 documents)


def _setup(tmp: Path, n_docs: int):
    import pandas as pd

    from neuronatlas.core import corpus, models

    spec = {"source": "packaged", "name": "wiki_summaries", "split": None, "shuffle": True}
    docs = []
    for d in corpus.iter_documents(spec, "wiki", 0):
        if d.text.strip():
            docs.append(d)
        if len(docs) >= n_docs:
            break
    frame = pd.DataFrame(
        {
            "doc_id": [d.doc_id for d in docs],
            "key": [d.key for d in docs],
            "text": [d.text for d in docs],
            "label": None,
            "n_words": [corpus.count_words(d.text) for d in docs],
        }
    )
    params = {"model": "minilm", "source": "packaged", "name": "all-minilm-l6-v2", "family": "auto", "seed": 0}
    models.prepare(params, tmp / "minilm")
    return frame, tmp / "minilm" / "manifest.json"


def vm_hwm_mb() -> float:
    """Peak RSS of this process image (VmHWM; unlike ru_maxrss it is not inherited across fork/exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _child(n_docs: int, budget: float) -> None:
    """Run in a fresh process: extraction only, print peak RSS (MB) and sizes."""
    import torch

    from neuronatlas.core import extract, models

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        frame, manifest = _setup(Path(tmp), n_docs)
        lm = models.load(manifest, "cpu", "float32", threads=2)
        base = vm_hwm_mb()
        out = extract.extract(
            lm,
            frame,
            ["residual", "mlp"],
            max_length=128,
            batch_tokens=4096,
            top_k=20,
            token_table_mb=budget,
            spill_dir=tmp,
            progress=False,
        )
        extract.cleanup(out)
        st = out["mlp"]
        print(
            json.dumps(
                {
                    "peak_rss_mb": vm_hwm_mb(),
                    "rss_before_mb": base,
                    "tokens": st.attrs["n_tokens"],
                    "distinct_ids": int(len(st.token_ids)),
                    "chunks": st.attrs["n_chunks"],
                }
            )
        )


def _rss(n_docs: int, budget: float) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "neuronatlas.bench.extraction", "--child", str(n_docs), str(budget)],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


@register("extraction")
def run(quick: bool = False) -> dict[str, Any]:
    """Useful tokens/s of extraction vs dense bare-forward tokens/s (MiniLM-L6, wiki); RSS at 1x / 10x."""
    import torch

    from neuronatlas.core import extract, models

    torch.set_num_threads(2)
    n1 = 60 if quick else DOCS_1X
    with tempfile.TemporaryDirectory() as tmp:
        frame, manifest = _setup(Path(tmp), n1)
        lm = models.load(manifest, "cpu", "float32", threads=2)
        sites = ["residual", "mlp"]
        result: dict[str, Any] = {}

        def run_extract():
            result["stats"] = extract.extract(lm, frame, sites, max_length=128, batch_tokens=4096, top_k=20, progress=False)

        # dense batches of real token ids, all full length: the bare-forward ceiling
        ids = np.concatenate(lm.tokenizer(frame["text"].tolist(), add_special_tokens=False)["input_ids"])
        B, T = 32, 128
        n_batches = max(1, len(ids) // (B * T))
        dense = [torch.from_numpy(ids[i * B * T : (i + 1) * B * T].reshape(B, T).astype(np.int64)) for i in range(n_batches)]
        mask = torch.ones(B, T, dtype=torch.long)

        def run_bare():
            with torch.inference_mode():
                for x in dense:
                    lm.model(input_ids=x, attention_mask=mask)

        run_bare()  # warm-up of both: the first extraction also pays for first-touch allocations of its tables
        run_extract()
        ext_t, bare_t = [], []
        for _ in range(2 if quick else 3):  # interleaved, medians
            ext_t.append(timed(run_extract))
            bare_t.append(timed(run_bare))
        useful = result["stats"]["mlp"].attrs["n_tokens"]
        nonpad = useful / result["stats"]["mlp"].attrs["padded_tokens"]
        ext_tps = useful / median(ext_t)
        bare_tps = n_batches * B * T / median(bare_t)
    n10 = 10 * n1
    budget_small = 256.0
    rss = {
        "default_budget_1x": _rss(n1, 4096),
        "default_budget_10x": _rss(n10, 4096),
        "bounded_budget_1x": _rss(n1, budget_small),
        "bounded_budget_10x": _rss(n10, budget_small),
    }
    return {
        "model": "all-MiniLM-L6-v2 (packaged)",
        "corpus": f"wiki_summaries, {n1} documents (1x)",
        "sites": sites,
        "threads": 2,
        "useful_tokens": useful,
        "non_pad_fraction": round(nonpad, 4),
        "extraction_useful_tokens_per_s": round(ext_tps, 1),
        "bare_forward_tokens_per_s": round(bare_tps, 1),
        "ratio": round(ext_tps / bare_tps, 3),
        "ratio_goal": ">= 0.85",
        "peak_rss_mb": {k: round(v["peak_rss_mb"], 1) for k, v in rss.items()},
        "distinct_ids": {k: v["distinct_ids"] for k, v in rss.items()},
        "tokens": {k: v["tokens"] for k, v in rss.items()},
        "chunks": {k: v["chunks"] for k, v in rss.items()},
        "rss_ratio_10x_over_1x_default_budget": round(
            rss["default_budget_10x"]["peak_rss_mb"] / rss["default_budget_1x"]["peak_rss_mb"], 3
        ),
        "rss_ratio_10x_over_1x_bounded_budget": round(
            rss["bounded_budget_10x"]["peak_rss_mb"] / rss["bounded_budget_1x"]["peak_rss_mb"], 3
        ),
        "bounded_budget_mb": budget_small,
        "rss_ratio_goal": "<= 1.1",
    }


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--child":
    _child(int(sys.argv[2]), float(sys.argv[3]))
