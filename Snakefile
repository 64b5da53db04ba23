# neuronatlas — the experiment grid of five neuron-interpretability papers as one DAG.
# Snakemake decides *what* runs; the library src/neuronatlas decides *how*.
#
#   snakemake --profile profiles/default                      # offline demo (config/demo.yaml)
#   snakemake --profile profiles/default --configfile config/replicate.yaml  # the offline evidence run
#   snakemake --profile profiles/default --configfile config/config.yaml     # the papers' full grid
#   snakemake --profile profiles/slurm   --configfile config/config.yaml     # on a SLURM cluster
from snakemake.utils import min_version, validate

import neuronatlas.core.config as core_config

min_version("9.0")


# The demo config is the embedded default; a --configfile replaces it (instead of being merged into it).
if not workflow.overwrite_configfiles:

    configfile: "config/demo.yaml"


# Library validation first: it names the key, the allowed values and cross-key problems.
core_config.validate(config, f"{workflow.basedir}/workflow/schemas/config.schema.yaml")
validate(config, "workflow/schemas/config.schema.yaml")


# common first (paths, the target registry); then one file per method, in data-flow order.
include: "workflow/rules/common.smk"
include: "workflow/rules/activations.smk"
include: "workflow/rules/clusters.smk"
include: "workflow/rules/intervention.smk"
include: "workflow/rules/n2g.smk"
include: "workflow/rules/textualization.smk"
include: "workflow/rules/modularity.smk"
include: "workflow/rules/replication.smk"
include: "workflow/rules/atlas.smk"


report: "workflow/report/workflow.rst"


rule all:
    default_target: True
    input:
        all_targets(),
