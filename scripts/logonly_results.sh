#!/usr/bin/env bash
# The log-only table of the README, end to end from a trained run:
#   scripts/logonly_results.sh RUN_DIR NAME [SEEDS]
# Three disjoint seed ranges, as the honest evaluation needs: the models are fitted on clean
# episodes of seeds 200000:200500, the thresholds calibrated on clean episodes of 100000:101000,
# and the scored stores (every fault of configs/attack/ the env supports, over SEEDS, default
# 0:200, each with its paired clean episodes) plus a clean test store (300000:301000, the FPR
# on 1,000 fresh clean episodes) use yet other seeds. Writes results/logonly-NAME.csv (long
# format, DESIGN.md "Results as data") and results/logonly-NAME.md. Re-running resumes.
# FAULTS (environment) chooses the faults. TASKSET (e.g. "taskset -c 1") pins every command.
set -euo pipefail
RUN=${1:?usage: scripts/logonly_results.sh RUN_DIR NAME [SEEDS]}
NAME=${2:?usage: scripts/logonly_results.sh RUN_DIR NAME [SEEDS]}
SEEDS=${3:-0:200}
BIN=${BIN:-.venv/bin}
STORES=stores/logonly-$NAME
T=${TASKSET:-}
mkdir -p "$STORES" results
FAULTS=${FAULTS:-worst_action obs_gaussian obs_fgsm obs_pgd obs_frozen obs_stale obs_bias \
  obs_drift obs_dropout action_noise action_delay action_dropout action_saturation \
  action_second_best stuck_actuator param_noise param_bitflip}

rollout() { $T "$BIN/forensics" rollout "$RUN" --no-progress "$@"; }
rollout -o "$STORES/fit" --seeds 200000:200500 attack=none
rollout -o "$STORES/calib" --seeds 100000:101000 attack=none
rollout -o "$STORES/cleantest" --seeds 300000:301000 attack=none
$T "$BIN/forensics" fit-models "$RUN" -c "$STORES/fit" -o "$STORES/models"
diags=()
for store in cleantest $FAULTS; do
  [[ $store == cleantest ]] || rollout -o "$STORES/$store" --seeds "$SEEDS" "attack=$store"
  $T "$BIN/forensics" diagnose "$STORES/$store" --run "$RUN" -c "$STORES/calib" \
    --models "$STORES/models" -o "$STORES/$store/diagnosis" --no-progress forensics.graphs=false
  diags+=("$STORES/$store/diagnosis")
done
$T "$BIN/forensics" evaluate "${diags[@]}" --long "results/logonly-$NAME.csv"
