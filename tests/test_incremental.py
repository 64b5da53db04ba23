"""Incremental re-runs: after a config edit, exactly the affected jobs run (dry-run job lists).

Every row of `CASES` is one config edit on the completed tiny DAG (the session fixture `tiny_dag`) and the
jobs that must re-run *for their own reason* (`seeds`: new jobs, or jobs whose params changed). The jobs
expected to run are the seeds plus everything downstream of them in the edited config's complete DAG
(`snakemake -n --forceall`); the test compares that set with what `snakemake -n` plans, so a parameter that
leaks into an unrelated job (too much re-runs) and a parameter missing from a job's params (too little
re-runs) both fail. `forbid` states, independently, jobs that must never run for that edit.

A method adds its rows here, e.g.
    Case("filter-threshold", lambda c: c["representations"]["min_count"].update(fix=3),
         seeds=lambda j: j.rule == "<the filter rule>" and j.wc.get("dataset") == "fix",
         forbid=lambda j: j.wc.get("dataset") == "notes")
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from neuronatlas.bench import dag as bench_dag
from neuronatlas.bench.dag import PlannedJob

Pred = Callable[[PlannedJob], bool]


def _never(_: PlannedJob) -> bool:
    return False


def model_of(job: PlannedJob) -> str | None:
    """The model a job belongs to (its `model` wildcard)."""
    return job.wc.get("model")


def extraction(job: PlannedJob) -> bool:
    """Whether the job is an extraction or a merge (the expensive model passes)."""
    return job.rule in ("extract_activations", "merge_activations")


@dataclass
class Case:
    """One config edit and the jobs it must (re-)run by itself; `changes_dag` when it adds or removes jobs."""

    id: str
    edit: Callable[[dict], None]
    seeds: Pred = _never
    forbid: Pred = _never
    changes_dag: bool = False


def _set(path: str, value) -> Callable[[dict], None]:
    """An edit setting the dotted config key `path` to `value`."""

    def edit(cfg: dict) -> None:
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[last] = value

    return edit


CASES = [
    Case("touch-nothing", lambda c: None),
    # one dataset's corpus setting: that dataset's shards and everything computed from them, nothing else
    Case(
        "dataset-setting",
        _set("datasets.fix.max_documents", 20),
        seeds=lambda j: j.rule == "shard_corpus" and j.wc["dataset"] == "fix",
        forbid=lambda j: j.wc.get("dataset") == "notes" or j.rule == "prepare_model",
    ),
    # adding a shard: the dataset is re-split round-robin, so its shards are re-extracted (not the others')
    Case(
        "add-shard",
        _set("datasets.fix.shards", 4),
        seeds=lambda j: j.rule == "shard_corpus" and j.wc["dataset"] == "fix",
        forbid=lambda j: j.wc.get("dataset") == "notes" or j.rule == "prepare_model",
        changes_dag=True,
    ),
    # an extraction setting of one model: that model's branch, from extraction down; not its preparation
    Case(
        "model-setting",
        _set("models.tgpt.max_length", 12),
        seeds=lambda j: j.rule == "extract_activations" and model_of(j) == "tgpt",
        forbid=lambda j: model_of(j) == "tbert" or j.rule in ("prepare_model", "shard_corpus"),
    ),
    # a model's architecture: the model is re-initialised, and all of its branch re-runs
    Case(
        "model-architecture",
        _set("models.tgpt.config.n_layer", 3),
        seeds=lambda j: j.rule == "prepare_model" and j.wc["model"] == "tgpt",
        forbid=lambda j: model_of(j) == "tbert" or j.rule == "shard_corpus",
    ),
    # a global extraction setting: every extraction re-runs; corpora and models stay
    Case(
        "global-extraction-setting",
        _set("activations.top_k", 5),
        seeds=lambda j: j.rule == "extract_activations",
        forbid=lambda j: j.rule in ("prepare_model", "shard_corpus"),
    ),
    # a new K: the cut jobs (one per variant cuts every K of the tree) and the jobs that aggregate over
    # clustering.k (the bootstrap stability per K, the cluster tables, the ablation of every clustering of
    # the triple); no extraction, no representation, no tree, no sweep
    Case(
        "add-k",
        lambda c: c["clustering"]["k"].append(3),
        seeds=lambda j: j.rule in ("clusters_cut", "clusters_bootstrap", "clusters_tables", "intervention_ablate"),
        forbid=lambda j: (
            extraction(j)
            or j.rule in ("prepare_model", "shard_corpus", "clusters_representation", "clusters_tree", "clusters_sweep")
            or j.rule.startswith(("n2g_", "textualization_", "modularity_"))
        ),  # (textualization has a K of its own)
        changes_dag=True,
    ),
    # one dataset's frequency-filter threshold: that dataset's filtered representation and what is computed
    # from it (smooth is built from filter); not the raw variant, not the other dataset, no extraction
    Case(
        "filter-threshold",
        lambda c: c["representations"]["min_count"].update(fix=3),
        seeds=lambda j: j.rule == "clusters_representation" and j.wc["dataset"] == "fix" and j.wc["variant"] == "filter",
        forbid=lambda j: (
            j.wc.get("dataset") not in (None, "fix")
            or j.wc.get("variant") == "raw"
            or extraction(j)
            or j.rule in ("prepare_model", "shard_corpus")
        ),
    ),
    # a per-neuron explanation setting (N2G): its layer jobs and table only (and what reads their results: the atlas
    # pages and the replication report)
    Case(
        "n2g-setting",
        _set("n2g.random_eval_windows", 3),
        seeds=lambda j: j.rule == "n2g_layer",
        forbid=lambda j: not j.rule.startswith(("n2g_", "atlas_")) and j.rule not in ("all", "replication_claims"),
    ),
    # a textualization setting: the optimisation jobs of that model, not the activation scan (and what reads their
    # results: the atlas pages and the replication report)
    Case(
        "textualization-steps",
        _set("textualization.steps", 6),
        seeds=lambda j: j.rule in ("textualization_single", "textualization_group"),
        forbid=lambda j: not j.rule.startswith(("textualization_", "atlas_")) and j.rule not in ("all", "replication_claims"),
    ),
    # atlas settings: the context shown re-runs the example windows (and their chunks), the numbers' digits only
    # the chunks; nothing upstream
    Case(
        "atlas-context",
        _set("atlas.context", 4),
        seeds=lambda j: j.rule == "atlas_examples",
        forbid=lambda j: not j.rule.startswith("atlas_") and j.rule != "all",
    ),
    Case(
        "atlas-digits",
        _set("atlas.digits", 3),
        seeds=lambda j: j.rule == "atlas_site",
        forbid=lambda j: not j.rule.startswith("atlas_") and j.rule != "all",
    ),
    # a new (model, dataset) pair: its extraction and what aggregates over the grid, nothing of the others
    # (the MLM head keeps its training data: `notes` has no eval_shards for its held-out metrics)
    Case(
        "add-dataset-to-model",
        lambda c: (c["models"]["tbert"]["datasets"].append("notes"), c["mlm_head"].__setitem__("datasets", ["fix"])),
        seeds=lambda j: (model_of(j) == "tbert" and j.wc.get("dataset") == "notes") or j.rule == "summarize_activations",
        forbid=lambda j: model_of(j) == "tbert" and j.wc.get("dataset") == "fix",
        changes_dag=True,
    ),
]


@pytest.fixture(scope="module")
def base(tiny_dag, tmp_path_factory):
    """The completed tiny DAG, its config and its complete job graph."""
    work, cfg = tiny_dag
    tmp = tmp_path_factory.mktemp("incremental")
    raw = yaml.safe_load((work / "tiny.yaml").read_text())
    full = bench_dag.dry_run(work, work / "tiny.yaml", "--forceall")
    return work, raw, tmp, full.jobs


def _describe(keys, jobs_by_key) -> str:
    lines = []
    for k in sorted(keys):
        j = jobs_by_key.get(k)
        reason = f"  [{j.reason[:160]}]" if j is not None and j.reason else ""
        lines.append(f"    {k[0]} {dict(k[1])}{reason}")
    return "\n".join(lines) or "    (none)"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id if isinstance(c, Case) else None)
def test_config_edit_runs_exactly_the_affected_jobs(base, case: Case):
    work, raw, tmp, base_jobs = base
    cfg = copy.deepcopy(raw)
    case.edit(cfg)
    path = Path(tmp) / f"{case.id}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    planned = bench_dag.dry_run(work, path)
    graph = bench_dag.dry_run(work, path, "--forceall").jobs if case.changes_dag else base_jobs
    seeds = {j.key for j in graph if case.seeds(j)}
    expected = bench_dag.downstream(graph, seeds)
    got = planned.keys()
    by_key = {j.key: j for j in planned.jobs} | {j.key: j for j in graph if j.key not in got}
    assert got == expected, (
        f"{case.id}: planned jobs differ from the expected ones\n"
        f"  planned but not expected:\n{_describe(got - expected, by_key)}\n"
        f"  expected but not planned:\n{_describe(expected - got, by_key)}"
    )
    forbidden = {j.key for j in planned.jobs if case.forbid(j)}
    assert not forbidden, f"{case.id}: these jobs must not run:\n{_describe(forbidden, by_key)}"
    if case.seeds is not _never:
        assert got, f"{case.id}: the edit should have re-run something"


def test_downstream_closure_follows_directory_outputs():
    """The closure used above: a job reading a file inside another job's directory output depends on it."""
    a = PlannedJob("shard", (("d", "x"),), outputs=("r/corpora/x/shards",))
    b = PlannedJob("extract", (("d", "x"),), inputs=("r/corpora/x/shards/shard-0.parquet",), outputs=("r/x/s.h5",))
    c = PlannedJob("merge", (("d", "x"),), inputs=("r/x/s.h5",), outputs=("r/x/stats.h5",))
    other = PlannedJob("extract", (("d", "y"),), inputs=("r/corpora/y/shards",), outputs=("r/y/s.h5",))
    assert bench_dag.downstream([a, b, c, other], {a.key}) == {a.key, b.key, c.key}
    assert bench_dag.downstream([a, b, c, other], set()) == set()


DRY_RUN_TEXT = """Building DAG of jobs...
Job stats:
job                          count
-------------------------  -------
shard_corpus                     1
merge_activations                1
all                              1
total                            3


[Mon Nov 23 05:48:56 2026]
rule shard_corpus:
    output: /r/corpora/fix/shards, /r/corpora/fix/manifest.json
    log: /r/logs/shard_corpus/fix.log
    jobid: 4
    benchmark: /r/benchmarks/shard_corpus/fix.tsv
    reason: Missing output files: /r/corpora/fix/shards
    wildcards: dataset=fix
    resources: tmpdir=/tmp, runtime=10, mem_mb=1500, mem=1.5 GB, mem_mib=1431
Shell command: None

[Mon Nov 23 05:48:56 2026]
rule merge_activations:
    input: /r/tgpt/fix/activations/shard-0.h5
    output: /r/tgpt/fix/mlp/activations/stats.h5
    log: /r/logs/merge_activations/tgpt/fix/mlp.log
    jobid: 7
    benchmark: /r/benchmarks/merge_activations/tgpt/fix/mlp.tsv
    reason: Input files updated by another job: /r/tgpt/fix/activations/shard-0.h5
    wildcards: model=tgpt, dataset=fix, site=mlp
    threads: 2
    resources: tmpdir=/tmp, runtime=10, mem_mb=1001
Shell command: None

[Mon Nov 23 05:48:56 2026]
localrule all:
    input: /r/tgpt/fix/mlp/activations/stats.h5
    jobid: 0
    reason: Input files updated by another job: /r/tgpt/fix/mlp/activations/stats.h5
    resources: tmpdir=/tmp
Job stats:
"""


def test_dry_run_parser_reads_jobs_and_stats():
    jobs = bench_dag.parse_jobs(DRY_RUN_TEXT)
    assert [j.rule for j in jobs] == ["shard_corpus", "merge_activations", "all"]
    s, m, a = jobs
    assert s.outputs == ("/r/corpora/fix/shards", "/r/corpora/fix/manifest.json") and s.wc == {"dataset": "fix"}
    assert s.res["mem_mb"] == "1500" and s.res["mem"] == "1.5 GB" and s.benchmark == "/r/benchmarks/shard_corpus/fix.tsv"
    assert m.threads == 2 and m.wc == {"model": "tgpt", "dataset": "fix", "site": "mlp"} and m.reason.startswith("Input files")
    assert m.log == ("/r/logs/merge_activations/tgpt/fix/mlp.log",)
    assert a.local and a.outputs == () and a.inputs == ("/r/tgpt/fix/mlp/activations/stats.h5",)
    assert bench_dag.parse_stats(DRY_RUN_TEXT) == {"shard_corpus": 1, "merge_activations": 1, "all": 1, "total": 3}
    assert bench_dag.parse_stats("Nothing to be done (all requested files are present and up to date).") == {}


def test_external_inputs_are_read_from_a_missing_input_error():
    text = """MissingInputException in rule clusters_representation in file "x.smk", line 44:
Missing input files for rule clusters_representation:
    output: /r/bert/yelp/residual/representations/smooth.h5
    wildcards: model=bert, dataset=yelp, site=residual, variant=smooth
    affected files:
        data/cc.en.300.bin
        data/other.vec

Using workflow specific profile"""
    assert bench_dag.external_inputs(text) == ["data/cc.en.300.bin", "data/other.vec"]
    assert bench_dag.external_inputs("Nothing to be done") == []


def test_holding_out_another_shard_keeps_the_corpus_and_the_models(base):
    """`eval_shards` decides what is extracted and merged, not how the corpus is split: no re-sharding."""
    work, raw, tmp, _ = base
    cfg = copy.deepcopy(raw)
    cfg["datasets"]["fix"]["eval_shards"] = [1]
    path = Path(tmp) / "eval-shards.yaml"
    path.write_text(yaml.safe_dump(cfg))
    planned = bench_dag.dry_run(work, path).jobs
    rules = {(j.rule, j.wc.get("dataset")) for j in planned}
    assert ("merge_activations", "fix") in rules and ("extract_activations", "fix") in rules  # shard 2 enters the statistics
    assert not {r for r, _ in rules} & {"shard_corpus", "prepare_model"}, sorted(rules)
    assert all(j.wc.get("dataset") != "notes" for j in planned if j.rule in ("extract_activations", "merge_activations"))
