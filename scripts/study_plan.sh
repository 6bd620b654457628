#!/usr/bin/env bash
# The CPU study of docs/reproduction.md, in priority order: each line trains what it has not trained yet and
# resumes what was interrupted, so re-running this script continues the study. Two runs at a time, one thread each.
#   nohup bash scripts/study_plan.sh > runs/study.log 2>&1 &
set -uo pipefail
cd "$(dirname "$0")/.."
study() { .venv/bin/python scripts/reproduce_cpu.py --jobs 2 "$@"; }
study --arms sm_t_scfuffn,ereg --seeds 0,1,2                                   # finding 6: the EReg candidate
study --arms ereg_before,ereg_weak --seeds 0,1                                 # the earlier default, and λ=0.01
study --arms ereg_wide --seeds 0,1                                             # finding 6: a wider band
study --arms ereg_weak,ereg_wide --seeds 2                                     # the default's third seed
study --arms ereg_before,sm_scfuffn --seeds 2
study --arms sm_scfuffn,ereg_paper_lambda --seeds 0,1,2                        # findings 5 and 6
study --arms sm_lr3e-3,sm_lr4e-3,sm_lr1e-2,sm_hi --seeds 0                     # where softmax-only collapses
study --arms ereg_per_query,ereg_frozen_theta --seeds 0,1,2                   # finding 6: the other variants
study --arms sm_ln_g,sm_g,sm_r,sm --seeds 0,1                                  # findings 1 and 2
study --arms sm_ln_g_hi,sm_hi,sm_scfuffn_hi,sm_scfuffn_a10_hi,sm_snorm_ffn_hi --seeds 0,1   # findings 3, 4, 7
study --arms sm_wnorm_ffn,sm_snorm_ffn,sm_scfuffn_a10 --seeds 0,1              # stabilizers at the paper's lr
study --report-only --seeds 0                                                   # every finished run, all arms
