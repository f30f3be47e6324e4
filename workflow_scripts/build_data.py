"""Rules build_sft / build_rl (`params.kind`): graded teacher rollouts -> SFT chat rows or RL prompt rows."""
from pipo.data.build import build_data_file
from pipo.workflow import rule_script

sm = snakemake  # noqa: F821 (injected by Snakemake)
data = sm.params.data
with rule_script(sm, "data", {"data": data}) as run:
    # Snakemake decides when to rebuild, so an output made from other inputs is replaced (overwrite).
    graded, rows, _ = build_data_file(sm.params.kind, sm.input.rollouts, sm.input.scores, sm.output[0],
                                      sft_selection=data["sft_selection"], rl_min_accuracy=data["rl_min_accuracy"],
                                      overwrite=True)
    run.log_metrics({"prompts": len(graded), "rows": len(rows),
                     "teacher_accuracy": sum(g.accuracy for g in graded) / max(1, len(graded))})
    run.log_output(sm.output[0])
