# The replication report (docs/methods/replication.md): every claim the methods declare (neuronatlas.<method>.claims),
# measured on the grid's outputs with a seeded bootstrap interval and judged by its decision rule.
#   replication_claims  once: results/replication/claims.csv + claims.md (first in the HTML report)
import neuronatlas.replication.dag as replication_dag

replication_dag.check_config(config)


rule replication_claims:
    input:
        paths.every_path(replication_dag.inputs(config)),
    output:
        csv=report(
            replication_dag.outputs(R)["csv"],
            category="0 Replication report",
            subcategory="claims",
            labels={"table": "claims and verdicts"},
            caption="../report/replication-claims.rst",
        ),
        md=replication_dag.outputs(R)["md"],
    log:
        log_path("replication_claims", "all"),
    benchmark:
        benchmark_path("replication_claims", "all")
    conda:
        CPU_ENV
    threads: 1
    resources:
        **job_resources("replication_claims", lambda wc, input, attempt: estimate.scaled(2000, 10, attempt)),
    params:
        claims=replication_dag.params(config),
        inputs=replication_dag.inputs(config),
    script:
        "../scripts/replication_claims.py"


register_targets("replication", lambda: replication_dag.targets(config))
