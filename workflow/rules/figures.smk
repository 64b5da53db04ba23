# Report-wide settings: the front page of `snakemake --report`. Every stage marks its own figures and
# tables as report() outputs (category = method, subcategory = model/dataset, caption in
# workflow/report/<stage>-*.rst); `snakemake --report results/report.html` collects all of them.


report: "../report/workflow.rst"
