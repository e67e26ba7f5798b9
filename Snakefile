# unetflow: OME-Zarr microscopy images -> patches -> trained U-Net -> tiled predictions -> metrics.
from snakemake.utils import min_version

min_version("9.0")


# The demo config is the default; a config given with --configfile replaces it whole
# (Snakemake would otherwise merge the two, and the demo datasets would creep into yours).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/normalize.smk"
include: "workflow/rules/patches.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/positions.smk"
include: "workflow/rules/export.smk"


rule all:
    default_target: True
    input:
        all_outputs,
