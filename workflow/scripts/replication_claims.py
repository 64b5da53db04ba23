# Glue for rule replication_claims: neuronatlas.replication.jobs.replication_claims.
from neuronatlas.core.job_log import logged
from neuronatlas.replication.jobs import replication_claims

with logged(snakemake.log[0]):
    replication_claims(snakemake.params.inputs, dict(snakemake.output.items()), snakemake.params.claims)
