# neuronatlas — the experiment grid of five neuron-interpretability papers as one DAG.
# Snakemake decides *what* runs; the library src/neuronatlas decides *how*.
#
#   snakemake --profile profiles/default                      # offline demo (config/demo.yaml)
#   snakemake --profile profiles/default --configfile config/config.yaml   # the papers' full grid
#   snakemake --profile profiles/slurm   --configfile config/config.yaml   # on a SLURM cluster
from snakemake.utils import min_version, validate

min_version("9.0")

# Building the DAG allocates millions of small objects (the paper grid: ~5,000 jobs); with Python's default
# thresholds the cyclic collector runs every 700 allocations and takes ~8% of a dry run's CPU. Jobs run in
# their own processes, so this only concerns the scheduler, whose garbage is small.
import gc

gc.set_threshold(100_000, 50, 50)

# The demo config is the embedded default; a --configfile replaces it (instead of being merged into it).
if not workflow.overwrite_configfiles:

    configfile: "config/demo.yaml"


# Library validation first: it names the key, the allowed values and cross-key problems.
import neuronatlas.config as nacfg

nacfg.validate(config, f"{workflow.basedir}/workflow/schemas/config.schema.yaml")


validate(config, "workflow/schemas/config.schema.yaml")


# common first (paths, grid helpers, the target registry); then one file per stage, in data-flow order.
include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/activations.smk"
include: "workflow/rules/representations.smk"
include: "workflow/rules/clustering.smk"
include: "workflow/rules/explanations.smk"
include: "workflow/rules/ablation.smk"
include: "workflow/rules/n2g.smk"
include: "workflow/rules/textualization.smk"
include: "workflow/rules/modularity.smk"
include: "workflow/rules/figures.smk"


rule all:
    input:
        all_targets(),
    default_target: True


# Snakemake recomputes two constants per job (callable resources' signatures, script cache paths) and samples
# benchmarks at a cost of ~28 ms per sample of a GB-size job. Memoize the constants (the paper grid's dry run:
# 12.8 s -> 9.7 s) and space the samples out; see neuronatlas/smk_speedups.py (off with NEURONATLAS_NO_SMK_SPEEDUPS=1).
import neuronatlas.smk_speedups

neuronatlas.smk_speedups.apply(workflow.rules)
