"""What rules/common.smk computes from a study, importable and unit-tested: paths, targets, input functions,
params, resources and the groups of rating files (issue 25).

`Plan(study)` holds the validated config (tunelens.config.Study) and answers for it; it reads no Snakemake
global, so a test builds one from a small config. rules/common.smk builds the run's `PLAN` and binds its
methods to the names the rules call (`model_input = PLAN.model_input`). Every config key the workflow reads
by string is read here (besides the rules' own `lookup(...)` params).

Only the Snakefile side imports this module: no job script reaches it, so no job's code hash
(tunelens.codehash) depends on it.
"""

from tunelens.workflow.paths import OUTPUTS, RESULTS, StudyPaths, alternation
from tunelens.workflow.plan import Plan
from tunelens.workflow.targets import Targets

__all__ = ["OUTPUTS", "RESULTS", "Plan", "StudyPaths", "Targets", "alternation"]
